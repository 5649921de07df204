// generateText through the OpenAI provider (see common.mjs for the environment).
import { generateText } from "ai";
import { callOptions, main } from "./common.mjs";

await main(async () => {
  const result = await generateText(callOptions());
  return {
    text: result.text,
    usage: result.usage,
    finishReason: result.finishReason,
    responseId: result.response?.id ?? null,
    modelId: result.response?.modelId ?? null,
  };
});
