#!/usr/bin/env node
// Drives a running gateway with the official `openai` Node package (v6), as a user would; the
// Node twin of scripts/openai_sdk_check.py.
//
// Usage: node openai_sdk_check.mjs BASE_URL MODEL   (BASE_URL like http://127.0.0.1:8080/v1)
// Setup: (cd scripts/node && npm ci)   -- openai is pinned to 6.x: 7.x needs Node >= 22.
// Exits non-zero with a message on the first thing that does not work.
//
// Extra request fields: openai-node v6 sends the body object as given (`post(path, { body,
// ...options })` in resources/chat/completions), so `verification_mode` goes straight into the
// body; extra response fields (`proofmesh`) are kept on the parsed objects.
import OpenAI, { NotFoundError } from 'openai';
import { VERSION } from 'openai/version';

class CheckFailed extends Error {}

function check(condition, what, detail) {
  if (!condition) {
    const shown = detail === undefined ? '' : `: ${JSON.stringify(detail)}`;
    throw new CheckFailed(`${what}${shown}`);
  }
}

const FINISH = new Set(['stop', 'length']);

async function main(argv) {
  if (argv.length !== 2) {
    console.error('usage: node openai_sdk_check.mjs BASE_URL MODEL');
    return 2;
  }
  const [baseURL, model] = argv;
  const client = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0, timeout: 120_000 });

  const models = [];
  for await (const m of client.models.list()) models.push(m.id);
  check(models.includes(model), `${model} not in models.list()`, models);

  const question = [{ role: 'user', content: 'What is the capital of France?' }];
  const plain = await client.chat.completions.create({
    model,
    messages: question,
    max_tokens: 32,
    temperature: 0,
    verification_mode: 'merkle',
  });
  const choice = plain.choices?.[0];
  const text = choice?.message?.content;
  check(typeof text === 'string' && text.length > 0, 'plain answer has no content', plain);
  check(FINISH.has(choice.finish_reason), 'plain finish_reason', choice.finish_reason);
  check(plain.usage?.completion_tokens > 0, 'plain usage.completion_tokens', plain.usage);
  check(plain.proofmesh?.verdict === 'passed', 'plain proofmesh.verdict', plain.proofmesh);

  const { response } = await client.chat.completions
    .create({
      model,
      messages: [{ role: 'user', content: 'Say hello.' }],
      max_tokens: 8,
      verification_mode: 'merkle',
    })
    .withResponse();
  check(
    response.headers.get('x-proofmesh-verdict') === 'passed',
    'x-proofmesh-verdict header',
    Object.fromEntries(response.headers.entries()),
  );

  let streamed = '';
  let finish = null;
  let proofmesh = null;
  const stream = await client.chat.completions.create({
    model,
    messages: question,
    max_tokens: 32,
    temperature: 0,
    stream: true,
    verification_mode: 'merkle',
  });
  for await (const chunk of stream) {
    const c = chunk.choices?.[0];
    if (c) {
      streamed += c.delta?.content ?? '';
      finish = c.finish_reason ?? finish;
    }
    if (chunk.proofmesh) proofmesh = chunk.proofmesh;
  }
  check(streamed === text, 'streamed text differs from the plain answer', { streamed, text });
  check(FINISH.has(finish), 'stream finish_reason', finish);
  check(proofmesh?.verdict === 'passed', 'stream proofmesh.verdict', proofmesh);

  // Structured output: a strict json_schema, constrained and checked by the gateway.
  const schema = {
    type: 'object',
    properties: {
      city: { type: 'string', maxLength: 24 },
      celsius: { type: 'integer', minimum: -50, maximum: 60 },
    },
    required: ['city', 'celsius'],
    additionalProperties: false,
  };
  const structured = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'What is the weather like in Paris today?' }],
    response_format: { type: 'json_schema', json_schema: { name: 'weather', schema, strict: true } },
    max_tokens: 64,
    temperature: 0,
    verification_mode: 'merkle',
  });
  const weather = JSON.parse(structured.choices[0].message.content);
  check(
    typeof weather.city === 'string' && Number.isInteger(weather.celsius),
    'structured answer does not match its schema',
    weather,
  );
  check(structured.proofmesh?.verdict === 'passed', 'structured proofmesh.verdict', structured.proofmesh);

  // One tool call, constrained to a well-formed call by tool_choice: 'required'.
  const calling = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'What is the weather like in Paris?' }],
    tools: [
      {
        type: 'function',
        function: {
          name: 'get_weather',
          description: 'The current weather in a city',
          parameters: {
            type: 'object',
            properties: { city: { type: 'string', maxLength: 24 } },
            required: ['city'],
            additionalProperties: false,
          },
        },
      },
    ],
    tool_choice: 'required',
    max_tokens: 64,
    temperature: 0,
    verification_mode: 'merkle',
  });
  const call = calling.choices[0].message.tool_calls?.[0];
  check(calling.choices[0].finish_reason === 'tool_calls', 'tool call finish_reason', calling.choices[0]);
  check(call?.function?.name === 'get_weather', 'tool call name', call);
  const args = JSON.parse(call.function.arguments);
  check(typeof args.city === 'string', 'tool call arguments', args);
  check(calling.proofmesh?.verdict === 'passed', 'tool call proofmesh.verdict', calling.proofmesh);

  try {
    await client.chat.completions.create({
      model: 'no-such-model',
      messages: [{ role: 'user', content: 'x' }],
    });
    throw new CheckFailed('unknown model accepted');
  } catch (e) {
    if (e instanceof CheckFailed) throw e;
    check(e instanceof NotFoundError, `unknown model: expected NotFoundError, got ${e?.constructor?.name}`, String(e));
    check(e.code === 'model_not_found', 'unknown model error code', e.error);
  }

  console.log(
    `openai-node ${VERSION}: models.list, plain, raw headers, stream, json_schema (${JSON.stringify(weather)}), a tool call (get_weather(${call.function.arguments})) and errors OK; answer: ${JSON.stringify(text)}`,
  );
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e) => {
    const what = e instanceof CheckFailed ? 'check failed' : `unexpected ${e?.constructor?.name ?? 'error'}`;
    console.error(`openai_sdk_check.mjs: ${what}: ${e?.message ?? e}`);
    process.exit(1);
  },
);
