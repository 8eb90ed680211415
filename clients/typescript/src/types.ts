/**
 * Friendly names for the generated OpenAPI types (`openapi.ts`, from `openapi/openapi.json` by
 * `npm run generate`): one source of truth with the server's pydantic contract.
 */

import type { components } from "./openapi.js";

type Schemas = components["schemas"];

export type Edit = Schemas["Edit"];
export type EditList = Schemas["EditList"];
export type EditStatus = Schemas["EditStatus"];
export type P2PEditRequest = Schemas["P2PEditRequest"];
export type IP2PEditRequest = Schemas["IP2PEditRequest"];
export type EditRequest = P2PEditRequest | IP2PEditRequest;
export type LocalBlend = Schemas["LocalBlend"];
export type Sweep = Schemas["Sweep"];
export type WebhookSpec = Schemas["WebhookSpec"];
export type ModelInfo = Schemas["ModelInfo"];
export type ResultImage = Schemas["ResultImage"];
export type AttentionMapResult = Schemas["AttentionMapResult"];
export type ErrorInfo = Schemas["ErrorInfo"];
export type Progress = Schemas["Progress"];

/** Body of a webhook POST (Standard Webhooks: `type`, `timestamp`, `data`); not a route, so not in the schema. */
export interface WebhookEvent {
  type: "edit.started" | "edit.progress" | "edit.completed";
  timestamp: string;
  data: Edit;
}

export const TERMINAL_STATUSES: readonly EditStatus[] = ["succeeded", "failed", "canceled"];

export function isTerminal(edit: Pick<Edit, "status">): boolean {
  return TERMINAL_STATUSES.includes(edit.status);
}

export type { components, paths, operations } from "./openapi.js";
