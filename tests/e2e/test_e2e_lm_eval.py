"""lm-eval's `local-completions` against `dormant serve`: a multiple-choice task of our own is
scored by loglikelihood, which needs token-id prompt batches, `echo` and prompt logprobs
(issue 11). The scores are checked against the same loglikelihoods computed here with
transformers."""

from __future__ import annotations

import json

import lm_eval
import pytest
from e2e_harness import launch_gateway, model_config

QUESTIONS = [
    {"question": "The capital of France is", "choices": [" Paris", " Berlin", " Madrid"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" seven", " four", " ninety"], "answer": 1},
    {"question": "The color of the clear daytime sky is", "choices": [" green", " purple", " blue"], "answer": 2},
]


@pytest.fixture(scope="module")
def gw(home, module_workdir):
    # engine native: prompt logprobs (echo) are its own; llama.cpp refuses logprobs with a 400
    gateway = launch_gateway(module_workdir, home, model_config(engine="native"))
    yield gateway
    gateway.stop()


@pytest.mark.timeout(600)
def test_local_completions_loglikelihood_matches_transformers(gw, tmp_path, model_dir):
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "tiny.yaml").write_text(
        "task: dormant_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
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
