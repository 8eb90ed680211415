/**
 * Friendly names for the generated OpenAPI types (`openapi.ts`, from `openapi/openapi.json` by
 * `npm run generate`): one source of truth with the server's pydantic contract.
 */
export const TERMINAL_STATUSES = ["succeeded", "failed", "canceled"];
export function isTerminal(edit) {
    return TERMINAL_STATUSES.includes(edit.status);
}
