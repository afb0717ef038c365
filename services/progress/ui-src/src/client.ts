// The UI's grpc-web client: typed stubs generated from protos/ (protoc-gen-es) over
// @connectrpc/connect-web's grpc-web transport. Bundled by esbuild into ui/grpc-client.js as
// the global `OpsGrpc`; the page's plain JavaScript (ui/app.js) uses only what is exported here.
import { create, toJson } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ApprovalService } from "./gen/opsconductor/execution/v1/approval_service_pb";
import { ExecutionService } from "./gen/opsconductor/execution/v1/execution_service_pb";
import { ProgressService } from "./gen/opsconductor/execution/v1/progress_service_pb";
import {
  ApprovalSchema,
  ApprovalState,
  ExecutionSchema,
  ExecutionStatus,
} from "./gen/opsconductor/execution/v1/types_pb";

function bearer(token: string): Interceptor {
  return (next) => async (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
}

/** The three services for one signed-in token, over grpc-web on this page's origin. */
export function clients(token: string) {
  const transport = createGrpcWebTransport({
    baseUrl: window.location.origin,
    interceptors: [bearer(token)],
  });
  return {
    executions: createClient(ExecutionService, transport),
    approvals: createClient(ApprovalService, transport),
    progress: createClient(ProgressService, transport),
  };
}

/** Plain JSON (proto3 JSON names, enums as names, timestamps as RFC 3339) for the page. */
export function executionJson(message: unknown): Record<string, unknown> {
  return toJson(ExecutionSchema, message as never, { alwaysEmitImplicit: true }) as Record<string, unknown>;
}

export function approvalJson(message: unknown): Record<string, unknown> {
  return toJson(ApprovalSchema, message as never, { alwaysEmitImplicit: true }) as Record<string, unknown>;
}

/** google.rpc.ErrorInfo.reason (field 1, a string) read from the detail's bytes. */
function errorInfoReason(bytes: Uint8Array): string {
  let i = 0;
  while (i < bytes.length) {
    const tag = bytes[i++];
    let length = 0;
    let shift = 0;
    while (i < bytes.length) {
      const b = bytes[i++];
      length |= (b & 0x7f) << shift;
      shift += 7;
      if (!(b & 0x80)) break;
    }
    if (tag === 0x0a) return new TextDecoder().decode(bytes.subarray(i, i + length));
    if ((tag & 7) !== 2) return "";
    i += length;
  }
  return "";
}

/** What went wrong, as the server said it: code name, message, ErrorInfo reason. */
export function describeError(err: unknown): { code: string; message: string; reason: string } {
  const e = ConnectError.from(err);
  let reason = "";
  for (const d of e.details) {
    if ("type" in d && d.type === "google.rpc.ErrorInfo" && "value" in d) {
      reason = errorInfoReason(d.value as Uint8Array);
    }
  }
  return { code: Code[e.code] ?? String(e.code), message: e.rawMessage, reason };
}

export { ApprovalState, ExecutionStatus, create, timestampDate };
