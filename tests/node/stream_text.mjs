// streamText through the OpenAI provider (see common.mjs): the text deltas counted as they arrive; an
// error part in the stream fails the script (streamText would otherwise only log it).
import { streamText } from "ai";
import { callOptions, main } from "./common.mjs";

await main(async () => {
  const result = streamText(callOptions());
  let chunks = 0;
  let deltas = "";
  for await (const part of result.fullStream) {
    if (part.type === "text-delta") {
      chunks += 1;
      deltas += part.text;
    } else if (part.type === "error") {
      throw part.error;
    }
  }
  const response = await result.response;
  const text = await result.text;
  if (text !== deltas) throw new Error(`text ${JSON.stringify(text)} is not the joined deltas ${JSON.stringify(deltas)}`);
  return {
    text,
    usage: await result.usage,
    finishReason: await result.finishReason,
    chunks,
    responseId: response?.id ?? null,
    modelId: response?.modelId ?? null,
  };
});
