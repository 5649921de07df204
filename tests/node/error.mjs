// A call that is expected to fail (a bad key, a rate limit): prints the error's class, statusCode and
// isRetryable. STREAM=1 uses streamText (the error arrives as the stream's error part) instead of
// generateText. A call that succeeds prints {"class": null, ...} so the test shows what came instead.
import { generateText, streamText } from "ai";
import { callOptions, describe, env, main } from "./common.mjs";

await main(async () => {
  try {
    if (env.STREAM === "1") {
      const result = streamText(callOptions());
      for await (const part of result.fullStream) {
        if (part.type === "error") return describe(part.error);
      }
      return { class: null, text: await result.text };
    }
    const result = await generateText(callOptions());
    return { class: null, text: result.text };
  } catch (err) {
    return describe(err);
  }
});
