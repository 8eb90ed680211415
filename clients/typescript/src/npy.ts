/**
 * Reading the attention-map arrays (`.npy`, shape `(tokens, h, w)`) that edits return, without numpy.
 *
 * Why here: per-token maps are what a user hovers over; the PNG grid is for people, the array is for code.
 * Supports NumPy format versions 1–3, little-endian float16/32/64 and C order (what the worker writes).
 */

export interface NpyArray {
  shape: number[];
  /** Values in C order, converted to float32. */
  data: Float32Array;
}

function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f;
  const fraction = h & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

/** Parses a `.npy` file; throws an Error that says what is unsupported. */
export function parseNpy(buffer: ArrayBuffer): NpyArray {
  const bytes = new Uint8Array(buffer);
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY
  if (bytes.length < 10 || magic.some((b, i) => bytes[i] !== b)) throw new Error("not a .npy file");
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const headerStart = major === 1 ? 10 : 12;
  const header = new TextDecoder(major === 3 ? "utf-8" : "latin1").decode(
    bytes.subarray(headerStart, headerStart + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*True/.test(header);
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (!descr || shapeText === undefined) throw new Error("malformed .npy header");
  if (fortran) throw new Error(".npy in Fortran order is not supported");
  const shape = shapeText.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = headerStart + headerLength;
  const data = new Float32Array(count);
  const read: Record<string, [number, (at: number) => number]> = {
    "<f4": [4, (at) => view.getFloat32(at, true)],
    "<f8": [8, (at) => view.getFloat64(at, true)],
    "<f2": [2, (at) => halfToFloat(view.getUint16(at, true))],
  };
  const reader = read[descr];
  if (!reader) throw new Error(`.npy dtype ${descr} is not supported (float16/32/64, little-endian)`);
  const [size, get] = reader;
  if (offset + count * size > bytes.length) throw new Error(".npy file is truncated");
  for (let i = 0; i < count; i++) data[i] = get(offset + i * size);
  return { shape, data };
}

/** One token's map of a `(tokens, h, w)` array, as a view (no copy). */
export function tokenMap(array: NpyArray, token: number): { width: number; height: number; values: Float32Array } {
  const [tokens, height, width] = array.shape;
  if (array.shape.length !== 3 || token < 0 || token >= tokens) throw new RangeError(`no token ${token}`);
  return { width, height, values: array.data.subarray(token * height * width, (token + 1) * height * width) };
}
