// Word-level diff between the source prompt and a target: what a P2P edit will do with them.
// replace swaps words one for one by position (the server requires equal word counts); refine aligns the
// prompts and injects attention for the shared words, so the target's other words are "added".

/** The prompt's words as the server splits them for `replace` (whitespace). */
export const spaceWords = (text) => text.trim().split(/\s+/).filter(Boolean);

/** Words as CLIP pre-tokenises them (lower case, punctuation dropped): what reweight/local blend may name. */
export const clipWords = (text) => (text.toLowerCase().match(/[\p{L}\p{N}']+/gu) ?? []);

/** Longest-common-subsequence alignment of two word lists: [{op: "same"|"added"|"removed", word}]. */
export function alignWords(source, target) {
  const n = source.length, m = target.length;
  const table = Array.from({ length: n + 1 }, () => new Array(m + 1).fill(0));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      table[i][j] = source[i].toLowerCase() === target[j].toLowerCase()
        ? table[i + 1][j + 1] + 1 : Math.max(table[i + 1][j], table[i][j + 1]);
    }
  }
  const ops = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && source[i].toLowerCase() === target[j].toLowerCase()) {
      ops.push({ op: "same", word: target[j] }); i++; j++;
    } else if (j < m && (i >= n || table[i][j + 1] >= table[i + 1][j])) {
      ops.push({ op: "added", word: target[j] }); j++;
    } else {
      ops.push({ op: "removed", word: source[i] }); i++;
    }
  }
  return ops;
}

/** The edit `auto` stands for: replace when every target has the source's word count, else refine. */
export function autoEdit(source, targets) {
  const n = spaceWords(source).length;
  return targets.every((t) => spaceWords(t).length === n) ? "replace" : "refine";
}

/**
 * What the edit will do to one target, as display items:
 * replace → [{op: "same"|"swap", word, from?}], refine → alignWords (same / added / removed).
 */
export function describeEdit(edit, source, target) {
  const s = spaceWords(source), t = spaceWords(target);
  if (edit === "replace" && s.length === t.length) {
    return t.map((word, k) => (word.toLowerCase() === s[k].toLowerCase() ? { op: "same", word } : { op: "swap", word, from: s[k] }));
  }
  if (edit === "replace") return [{ op: "error", word: `replace needs ${s.length} words, this target has ${t.length}` }];
  return alignWords(s, t);
}
