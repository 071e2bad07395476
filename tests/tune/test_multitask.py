"""Multitask prompt tuning: one shared prompt, a factor per task."""

import json
import random

import peft
import torch
import transformers
from safetensors.torch import save_file

from stoker.cli import main
from stoker.data.loader import DataLoader
from stoker.data.tokenizer import Tokenizer
from stoker.generate import load_trained
from stoker.models.gpt import GPT, GPTConfig
from stoker.models.hf import hf_config, to_hf
from stoker.tune.adapters import apply_adapter, save_adapter
from stoker.tune.evaluate import evaluate_records
from stoker.tune.prompt import apply_prompt
from stoker.tune.records import RecordRows, read_records
from stoker.tune.setup import ADAPTER_DIR
from tests.tune.test_tune import COMMON

WORDS = ["def", "class", "return", "import", "for", "while", "if", "with", "yield", "raise"]
ANSWERS = {"yes": " True", "no": " False"}


def records(path, n: int, seed: int, tasks: dict[str, str]) -> str:
    """The same inputs for every task; only the task tells which answer is right."""
    rng, lines = random.Random(seed), []
    for _ in range(n):
        line = " ".join(rng.choice(WORDS) for _ in range(3))
        lines += [json.dumps({"prompt": f"{line}\n=", "completion": ans, "task": t}) for t, ans in tasks.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_tasks_trained_together_each_beat_the_base(small_data, tmp_path):
    """A random model with large weights (its output follows its input closely, so a prompt can
    steer it) learns two tasks whose inputs are identical: each task's prompt must be its own."""
    tok = Tokenizer.load(small_data)
    model = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=tok.vocab_size, block_size=64))
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    evals = {t: records(tmp_path / f"{t}.jsonl", 20, 2, {t: a}) for t, a in ANSWERS.items()}
    before = {t: evaluate_records(model, tok, p)["accuracy"] for t, p in evals.items()}
    examples, tasks = read_records(records(tmp_path / "train.jsonl", 100, 1, ANSWERS), tok, 33)
    apply_prompt(model, 8, seed=0, tasks=tasks)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["prompt.embedding", "prompt.task_cols", "prompt.task_rows"]
    loader = DataLoader(RecordRows(examples, 32, tok.eot_id, pack=False), 16, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    model.train()
    for step in range(120):
        model(*loader.batch(step), task=loader.tasks(step)).backward()
        opt.step()
        opt.zero_grad()
    after = {t: evaluate_records(model, tok, p)["accuracy"] for t, p in evals.items()}
    # measured: 0% before, 65% and 80% after (all of " True"/" False" and the end-of-text exact)
    assert all(before[t] == 0 for t in ANSWERS) and all(after[t] >= 0.3 for t in ANSWERS), (before, after)
    # each answer under the other task's prompt: wrong, so the tasks' prompts differ
    swapped = records(tmp_path / "swapped.jsonl", 20, 2, {"no": ANSWERS["yes"]})
    assert evaluate_records(model, tok, swapped)["accuracy"] <= 0.1


def test_multitask_adapter_gives_peft_logits(tmp_path):
    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=300, block_size=64)
    base = GPT(cfg)
    base.init_weights(seed=1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(hf_config(cfg)))
    save_file(to_hf({k: v.detach() for k, v in base.state_dict().items()}, cfg), str(tmp_path / "b" / "model.safetensors"))
    apply_prompt(base, 5, seed=2, tasks=["a", "b", "c"], task_rank=2)
    with torch.no_grad():
        base.prompt.task_cols.normal_()
        base.prompt.task_rows.normal_()
    save_adapter(base, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b"), tmp_path / "a")
    idx, task = torch.randint(0, 300, (3, 7), generator=torch.Generator().manual_seed(0)), torch.tensor([2, 0, 1])
    with torch.no_grad():
        ours = base.eval()(idx, task=task)
        theirs = pm.eval()(input_ids=idx, task_ids=task).logits[:, 5:]  # fp32: measured 2e-7 apart
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
        again = GPT(cfg)
        again.init_weights(seed=1)
        apply_adapter(again, tmp_path / "a")
        assert again.prompt.task_names == ["a", "b", "c"] and torch.equal(again.eval()(idx, task=task), ours)


def test_multitask_run_from_the_cli_and_a_new_task_from_its_shared_prompt(tune_base, tmp_path):
    train = records(tmp_path / "train.jsonl", 16, 1, ANSWERS)
    out = tmp_path / "mt"
    assert main(["tune", str(tune_base), str(train), "--method", "multitask-prompt", "--out", str(out), *COMMON,
                 "--train.steps=4", "--tune.virtual_tokens=4", "--tune.task_rank=2"]) == 0
    run, tok, _ = load_trained(out)
    assert run.prompt.task_names == ["yes", "no"] and run.prompt.task_cols.shape == (2, 4, 2)
    base, _, _ = load_trained(tune_base)
    apply_adapter(base, out / ADAPTER_DIR)
    idx, task = torch.tensor([tok.encode("def if\n=")] * 2), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(base(idx, task=task), run(idx, task=task))
    # A new task starts from the multitask run's shared prompt.
    new = records(tmp_path / "new.jsonl", 8, 3, {"maybe": " None"})
    assert main(["tune", str(tune_base), str(new), "--method", "prompt", "--out", str(tmp_path / "new"), *COMMON,
                 "--train.steps=1", "--train.lr=1e-9", "--tune.virtual_tokens=4",
                 f"--tune.prompt_from={out / ADAPTER_DIR}"]) == 0
    started, _, _ = load_trained(tmp_path / "new")
    assert (started.prompt.embedding - run.prompt.embedding).abs().max() < 1e-6  # one step of lr 1e-9 away
