"""`pmetal serve` as users call it: a real server process, the real `openai` client.

Two server processes per module (started together): an open one serving a tiny random Llama with
SmolLM2's tokenizer and template plus one LoRA adapter, and a strict one (an API key, one request
at a time, no queue) for 401, 429 and disconnects.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

PROMPTS = [f"Question {i}: say something about the number {i * 7}." for i in range(16)]


def test_serve_help_imports_nothing_heavy():
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, pmetal.cli.dispatch as d; d.build_parser('serve'); "
         "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'uvicorn', 'peft') if m in sys.modules))"],
        capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]", probe.stdout


def test_tool_calls_are_parsed_from_tagged_json():
    from pmetal.serve.text import parse_tool_calls

    text = 'Let me look.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    content, calls = parse_tool_calls(text + "<tool_call>not json</tool_call>")
    assert content == "Let me look.<tool_call>not json</tool_call>"
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert parse_tool_calls("no calls here") == ("no calls here", [])


class _CharTokenizer:
    """Token id = a character code: what RowText needs (decode) without a real vocabulary."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_row_text_holds_back_what_may_become_a_stop_string_or_a_tool_call():
    from pmetal.serve.text import RowText

    row = RowText(_CharTokenizer(), stop=["END"])
    sent = []
    for piece in ["Hello E", "N", "D and more"]:
        row.add([ord(c) for c in piece])
        sent.append(row.ready())
    assert sent == ["Hello ", "", ""] and row.hit_stop and row.text == "Hello "
    tools = RowText(_CharTokenizer(), hold_tool_calls=True)
    tools.add([ord(c) for c in 'Sure.<tool_call>{"name": "f", "arguments": {}}</tool_call>'])
    assert tools.ready() == "Sure." and tools.ready(final=True) == ""
    plain = RowText(_CharTokenizer(), hold_tool_calls=True)
    plain.add([ord(c) for c in "a <tool_call> that is not one"])
    assert plain.ready() == "a " and plain.ready(final=True) == "<tool_call> that is not one"


def test_tools_are_described_for_a_template_without_them(tiny_model_dir):
    from transformers import AutoTokenizer

    from pmetal.serve.text import chat_prompt_ids, template_takes_tools

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not template_takes_tools(tokenizer)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "content": "sunny"}]
    text = tokenizer.decode(chat_prompt_ids(tokenizer, messages, tools))
    assert '"name": "get_weather"' in text and "<tool_call>" in text and "<tool_response>sunny</tool_response>" in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # one torch thread: two servers and the test share a small CPU (oversubscribed threads slow every step)
    # its output goes to a file: an unread pipe would block the server once full
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "pmetal", "serve", "--port", str(port), "--accelerator", "cpu",
                             *flags], stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.log = log
    return proc, f"http://127.0.0.1:{port}"


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
        return json.loads(r.read())


def output(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{output(proc)}")
        try:
            health(url)
            return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health in {timeout} s:\n{output(proc)}")


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter over the tiny model with random (non-zero) B matrices: different answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    path = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def servers(tiny_model_dir, adapter_dir):
    open_proc, open_url = start_server("--model", str(tiny_model_dir), "--adapter", f"styled={adapter_dir}",
                                       "--max-concurrency", "8", "--max-queue", "32")
    strict_proc, strict_url = start_server("--model", str(tiny_model_dir), "--api-key", "sekret",
                                           "--max-concurrency", "1", "--max-queue", "0")
    try:
        wait_healthy(open_proc, open_url)
        wait_healthy(strict_proc, strict_url)
        yield {"open": open_url, "strict": strict_url, "model": str(tiny_model_dir)}
    finally:
        for proc in (open_proc, strict_proc):
            proc.kill()
            proc.wait()
            proc.log.close()


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def chat(c, model, prompt, **kw):
    kw = {"temperature": 0, "max_tokens": 12, **kw}
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def test_models_lists_base_and_adapters(servers):
    ids = [m.id for m in client(servers["open"]).models.list().data]
    assert ids == [servers["model"], "styled"]


def test_greedy_answer_is_hf_generate_and_streaming_equals_it(servers, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c = client(servers["open"])
    answer = chat(c, servers["model"], PROMPTS[0])
    text = answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 12
    # the same greedy answer from transformers' own generate
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert answer.usage.prompt_tokens == ids.shape[1]
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    stream = chat(c, servers["model"], PROMPTS[0], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_completions_endpoint_streams_the_same_text(servers):
    c = client(servers["open"])
    whole = c.completions.create(model=servers["model"], prompt="Once upon a time", max_tokens=10, temperature=0)
    parts = c.completions.create(model=servers["model"], prompt="Once upon a time", max_tokens=10, temperature=0,
                                 stream=True)
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text != ""


def test_sixteen_concurrent_clients_get_their_sequential_answers(servers):
    c = client(servers["open"])
    sequential = [chat(c, servers["model"], p).choices[0].message.content for p in PROMPTS]
    assert len(set(sequential)) > 1  # the prompts really are answered differently
    answers: dict[int, str] = {}

    def ask(i):
        answers[i] = chat(client(servers["open"]), servers["model"], PROMPTS[i]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [answers.get(i) for i in range(16)] == sequential
    assert health(servers["open"])["largest_batch"] > 1  # they were answered together, not one by one


def test_a_request_joins_the_running_rows_and_neither_answer_changes(servers):
    c = client(servers["open"])
    long_alone = chat(c, servers["model"], PROMPTS[7], max_tokens=160).choices[0].message.content
    short_alone = chat(c, servers["model"], PROMPTS[8], max_tokens=4).choices[0].message.content
    stream = chat(c, servers["model"], PROMPTS[7], max_tokens=160, stream=True)
    chunks = iter(stream)
    parts = [next(chunks).choices[0].delta.content or "", next(chunks).choices[0].delta.content or ""]
    short = chat(client(servers["open"]), servers["model"], PROMPTS[8], max_tokens=4).choices[0].message.content
    assert health(servers["open"])["admitted"] == 1  # answered while the long one is still in flight
    parts += [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert short == short_alone and "".join(parts) == long_alone


def test_adapter_by_name_answers_differently(servers):
    c = client(servers["open"])
    base = chat(c, servers["model"], PROMPTS[1]).choices[0].message.content
    styled = chat(c, "styled", PROMPTS[1]).choices[0].message.content
    assert styled != base
    assert chat(c, "styled", PROMPTS[1]).choices[0].message.content == styled  # the adapter, deterministically
    assert chat(c, servers["model"], PROMPTS[1]).choices[0].message.content == base  # and the base back
    with pytest.raises(openai.NotFoundError) as e:
        chat(c, "nonexistent", PROMPTS[1])
    assert e.value.body["code"] == "model_not_found"


def test_stop_n_and_seed(servers):
    c = client(servers["open"])
    full = chat(c, servers["model"], PROMPTS[2], max_tokens=16).choices[0].message.content
    stop = full[6:9]
    cut = chat(c, servers["model"], PROMPTS[2], max_tokens=16, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.find(stop)] and cut.finish_reason == "stop"
    two = chat(c, servers["model"], PROMPTS[2], n=2)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[0].message.content == two.choices[1].message.content == full[: len(two.choices[0].message.content)]
    sampled = [chat(c, servers["model"], PROMPTS[3], temperature=1.0, seed=7).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    busy = chat(client(servers["open"]), servers["model"], PROMPTS[9], max_tokens=80, temperature=0.8, stream=True)
    next(iter(busy))  # another request, of other settings, is decoding in the same rounds
    assert chat(c, servers["model"], PROMPTS[3], temperature=1.0, seed=7).choices[0].message.content == sampled[0]
    busy.close()


@pytest.mark.parametrize("change, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"logprobs": True}, "logprobs"),
])
def test_bad_requests_get_openai_shaped_400s(servers, change, param):
    body = {"model": servers["model"], "messages": [{"role": "user", "content": "hi"}], **change}
    request = urllib.request.Request(f"{servers['open']}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 400
    error = json.loads(e.value.read())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_tools_are_offered_and_the_request_answers(servers):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    answer = chat(client(servers["open"]), servers["model"], "Weather in Paris?", tools=tools)
    assert answer.usage.prompt_tokens > chat(client(servers["open"]), servers["model"], "Weather in Paris?").usage.prompt_tokens


def test_api_key_is_required(servers):
    with pytest.raises(openai.AuthenticationError):
        chat(client(servers["strict"], "wrong"), servers["model"], "hi")
    assert chat(client(servers["strict"], "sekret"), servers["model"], "hi", max_tokens=2).choices[0].message


def test_full_server_says_429_and_a_disconnect_frees_the_slot(servers):
    c = client(servers["strict"], "sekret")
    stream = chat(c, servers["model"], PROMPTS[4], max_tokens=900, stream=True)
    next(iter(stream))  # running: the one place is taken
    with pytest.raises(openai.RateLimitError) as e:
        chat(c, servers["model"], PROMPTS[5], max_tokens=2)
    assert e.value.body["code"] == "rate_limit_exceeded"
    stream.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 15
    while (load := health(servers["strict"]))["admitted"] or load["running"]:
        assert time.monotonic() < deadline, f"the slot was not freed: {load}"
        time.sleep(0.1)
    assert chat(c, servers["model"], PROMPTS[5], max_tokens=2).choices[0].finish_reason == "length"


def test_a_waiting_client_that_gives_up_frees_the_slot(servers):
    """A non-streaming client that leaves mid-answer: its generation stops (well before it would end)."""
    c = client(servers["strict"], "sekret")
    start = time.monotonic()
    chat(c, servers["model"], PROMPTS[6], max_tokens=400)
    whole = time.monotonic() - start
    with pytest.raises(openai.APITimeoutError):
        chat(c.with_options(timeout=whole / 4), servers["model"], PROMPTS[6], max_tokens=400)
    gone = time.monotonic()
    while (load := health(servers["strict"]))["admitted"] or load["running"]:
        assert time.monotonic() - gone < whole / 2, f"the slot was not freed: {load}"
        time.sleep(0.02)
    assert chat(client(servers["strict"], "sekret"), servers["model"], "hi", max_tokens=2).choices[0].message
