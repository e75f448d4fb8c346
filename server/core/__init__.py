"""The API-neutral serving core: every generation route (OpenAI chat and completions, the
Responses API, Ollama chat and generate) goes through it.

    job = GenerationInput([prompt_ids], {"temperature": 0.2, "max_tokens": None}, grammar=spec, tools=tools)
    generation = await admit(served, job, request_id, FIELD_NAMES)   # 400 / 429 raise here
    async for event in serve(generation): ...                          # ChoiceStep ..., then UsageEvent

Design choices:
- An API adapter only parses (its request -> `GenerationInput`: prompt ids,
  `SamplingParams` fields, a grammar or tools) and renders (events -> its
  wire objects and framing: SSE for OpenAI, NDJSON for Ollama).
- `SamplingParams` is frozen and validates itself once; its errors name the
  engine field, and `admit` renames them with the API's map (`max_tokens` ->
  `max_completion_tokens`, `options.num_predict`, ...) without parsing text.
- `admit` waits for the engine's first output, so admission errors become an
  HTTP status, never an error inside a 200 stream.
- `serve` turns engine outputs into events: per engine step and choice one
  `ChoiceStep` (text delta, tool-call deltas parsed out of the text,
  logprobs converted to token text and bytes, the finish), then one
  `UsageEvent`. Steps are the unit because every wire format frames per
  step (a chunk, a line); `collect` folds the same events into whole answers,
  so a stream and a whole answer cannot disagree.

Modules: events (the event types), pieces (token text and bytes, the one
logprob converter), streams (admitted engine streams, merging, closing),
serving (admission, serve, collect), http (bodies, disconnects, streaming
responses).
"""
