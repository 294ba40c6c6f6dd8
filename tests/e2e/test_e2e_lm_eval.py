"""lm-eval against `dormant serve`, with tasks of our own (issue 11):

- `local-completions`: a multiple-choice task scored by loglikelihood, which needs token-id
  prompt batches, `echo` and prompt logprobs; the scores are checked against the same
  loglikelihoods computed here with transformers.
- `local-chat-completions` with `apply_chat_template`: a generate_until task, whose `until` only
  the server applies (lm-eval does not cut chat answers itself); the answers are checked
  against the same requests sent with the openai SDK, not against SmolLM2's words.
"""

from __future__ import annotations

import json

import lm_eval
import pytest
from e2e_harness import launch_gateway, model_config

SHORT_QUESTIONS = [
    {"question": "What is the capital of France?", "answer": "Paris"},
    {"question": "How many legs does a spider have?", "answer": "Eight"},
    {"question": "What color is grass?", "answer": "Green"},
]
QUESTIONS = [
    {"question": "The capital of France is", "choices": [" Paris", " Berlin", " Madrid"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" seven", " four", " ninety"], "answer": 1},
    {"question": "The color of the clear daytime sky is", "choices": [" green", " purple", " blue"], "answer": 2},
]


@pytest.fixture(scope="module")
def gw(home, module_workdir):
    # logprobs need the native engine
    gateway = launch_gateway(module_workdir, home, model_config(engine="native"))
    yield gateway
    gateway.stop()


def write_task(folder, name: str, rows: list[dict], body: str) -> None:
    """An lm-eval task of our own in `folder`: `rows` as its JSON lines test split, `body` the
    rest of its YAML (output type, doc_to_*, metrics)."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n" + body)


@pytest.mark.timeout(600)
def test_local_completions_loglikelihood_matches_transformers(gw, tmp_path, model_dir):
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_task(tmp_path, "dormant_tiny", QUESTIONS,
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model=smollm2,base_url={gw.base_url}/v1/completions,tokenizer={model_dir},"
                   "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1,batch_size=4",
        tasks=["dormant_tiny"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
    )
    samples = results["samples"]["dormant_tiny"]
    assert len(samples) == len(QUESTIONS)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        question = QUESTIONS[sample["doc_id"]]
        for choice, (served, _greedy) in zip(question["choices"], sample["filtered_resps"]):
            context = tokenizer.encode(question["question"])
            whole = tokenizer.encode(question["question"] + choice)
            with torch.inference_mode():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0], dim=-1)
            expected = sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole)))
            assert abs(float(served) - expected) < 0.02, (question["question"], choice)
    assert results["results"]["dormant_tiny"]["acc,none"] >= 2 / 3


@pytest.mark.timeout(600)
def test_local_chat_completions_generate_until(gw, tmp_path):
    from lm_eval.tasks import TaskManager

    write_task(tmp_path, "dormant_short", SHORT_QUESTIONS,
        "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\n"
        # SmolLM2 answers in sentences: a period nearly always comes, and then cuts the answer
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 24\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n"
    )
    results = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=f"model=smollm2,base_url={gw.base_url}/v1/chat/completions,num_concurrent=1,max_retries=1",
        tasks=["dormant_short"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
        apply_chat_template=True,
    )
    samples = sorted(results["samples"]["dormant_short"], key=lambda s: s["doc_id"])
    assert len(samples) == len(SHORT_QUESTIONS)
    assert 0.0 <= results["results"]["dormant_short"]["exact_match,none"] <= 1.0
    client = gw.openai()
    cut = 0
    for sample in samples:
        (answer,) = sample["resps"][0]
        context, _gen_kwargs = sample["arguments"][0]  # lm-eval's JsonChatStr: the messages as JSON
        messages = json.loads(context.prompt)
        assert messages == [{"role": "user", "content": SHORT_QUESTIONS[sample["doc_id"]]["question"]}]
        assert answer and "." not in answer
        same = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                              stop=["."], seed=1234).choices[0]
        assert answer == same.message.content
        cut += same.finish_reason == "stop"
    assert cut >= 2, "the stop string should end most answers before max_gen_toks"
