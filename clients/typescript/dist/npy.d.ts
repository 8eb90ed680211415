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
/** Parses a `.npy` file; throws an Error that says what is unsupported. */
export declare function parseNpy(buffer: ArrayBuffer): NpyArray;
/** One token's map of a `(tokens, h, w)` array, as a view (no copy). */
export declare function tokenMap(array: NpyArray, token: number): {
    width: number;
    height: number;
    values: Float32Array;
};
