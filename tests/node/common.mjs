// Shared by the scripts: the provider built the way the migration guide says, from the environment.
// BASE_URL (the gateway's /v1), API_KEY, MODEL; API=responses (default: openai(MODEL), the Responses
// API) or API=chat (openai.chat(MODEL), chat completions); PROMPT; MAX_OUTPUT_TOKENS (optional).
import { createOpenAI } from "@ai-sdk/openai";

export const env = process.env;

export function model() {
  for (const name of ["BASE_URL", "API_KEY", "MODEL"]) {
    if (!env[name]) throw new Error(`${name} is not set`);
  }
  const openai = createOpenAI({ baseURL: env.BASE_URL, apiKey: env.API_KEY });
  const api = env.API ?? "responses";
  if (api === "chat") return openai.chat(env.MODEL);
  if (api === "responses") return openai(env.MODEL);
  throw new Error(`API must be responses or chat, got ${api}`);
}

export function callOptions() {
  const options = { model: model(), prompt: env.PROMPT ?? "Say hello.", maxRetries: Number(env.MAX_RETRIES ?? 0) };
  if (env.MAX_OUTPUT_TOKENS) options.maxOutputTokens = Number(env.MAX_OUTPUT_TOKENS);
  return options;
}

// An error, as far as a test needs it: the class, and APICallError's fields when it is one.
export function describe(err) {
  return {
    class: err?.constructor?.name ?? typeof err,
    name: err?.name,
    message: String(err?.message ?? err),
    statusCode: err?.statusCode ?? null,
    isRetryable: err?.isRetryable ?? null,
    url: err?.url ?? null,
    retryAfter: err?.responseHeaders?.["retry-after"] ?? null,
    responseBody: err?.responseBody ?? null,
  };
}

// Print one JSON document on stdout; an unexpected failure goes to stderr (exit 1) for the assertion.
export async function main(fn) {
  try {
    process.stdout.write(JSON.stringify(await fn()) + "\n");
  } catch (err) {
    process.stderr.write(JSON.stringify(describe(err)) + "\n" + (err?.stack ?? "") + "\n");
    process.exitCode = 1;
  }
}
