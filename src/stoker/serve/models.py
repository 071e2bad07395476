"""Several models by name behind one server: loaded on first use, least recently used unloaded."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stoker.config import ConfigError, load_config
from stoker.data.tokenizer import Tokenizer
from stoker.generate import load_trained, run_model_config
from stoker.models.gpt import GPT, pack_linears
from stoker.serve.adapters import Adapters, AdapterSpec, describe
from stoker.serve.engine import Engine, Event, Handle, SamplingParams
from stoker.serve.metrics import ServeMetrics
from stoker.tune.lora import merge_lora
from stoker.train.checkpoint import latest_checkpoint


class UnknownModel(KeyError):
    pass


@dataclass
class Model:
    """A servable run directory, or an adapter of one (`parent`: the run's name): its tokenizer
    and context are known before its weights load."""

    name: str
    run_dir: Path
    tokenizer: Tokenizer
    context: int
    engine: Engine | None = None
    last_used: float = 0.0
    loads: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    parent: str | None = None
    adapter: AdapterSpec | None = None
    adapters: list[AdapterSpec] = field(default_factory=list)  # a run's: those served on it
    max_token_bytes: int = 0  # the most bytes of text one token stands for

    def __post_init__(self) -> None:
        # An invalid UTF-8 piece decodes to U+FFFD, 3 bytes for each byte it stands for: an
        # overestimate, which is the safe side for the bound the server draws from it.
        self.max_token_bytes = self.max_token_bytes or max(
            len(self.tokenizer.decode([i]).encode()) for i in range(self.tokenizer.vocab_size))


def parse_models(specs: Sequence[str]) -> dict[str, Path]:
    """`RUN_DIR` or `NAME=RUN_DIR` -> {name: run_dir}; the name defaults to the directory's name."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        run_dir = Path(path if sep else spec)
        name = name if sep else run_dir.resolve().name
        if not name:
            raise ConfigError(f"{spec!r}: empty model name; write NAME=RUN_DIR")
        if name in out:
            raise ConfigError(f"model name {name!r} is given twice; alias one as NAME=RUN_DIR")
        if not (run_dir / "model.json").is_file():
            raise ConfigError(f"{str(run_dir)!r} is not a training run directory (no model.json)")
        if latest_checkpoint(run_dir) is None:
            raise ConfigError(f"{str(run_dir)!r} holds no complete checkpoint yet")
        if (run_dir / "config.toml").is_file() and "prompt" in (c := load_config(run_dir / "config.toml")).tune.method:
            raise ConfigError(f"{str(run_dir)!r} is a prompt-tuning run: serve its base with the run as an adapter, "
                              f"stoker serve {c.model.init_from} --adapter {run_dir.resolve().name}={run_dir} "
                              "(LoRA and full fine-tuning runs also serve as they are)")
        out[name] = run_dir
    if not out:
        raise ConfigError("give at least one run directory to serve")
    return out


def parse_adapters(specs: Sequence[str], run_dirs: dict[str, Path]) -> dict[str, list[tuple[str, Path]]]:
    """`NAME=DIR` adapters (a PEFT adapter directory or a tuning run), and those under each run's
    `adapters/` (named by their directory) -> {model name: [(adapter name, dir)]}. With several
    models, an adapter goes to the one its base_model_name_or_path names."""
    from stoker.serve.adapters import adapter_dir
    from stoker.tune.adapters import read_adapter

    out: dict[str, list[tuple[str, Path]]] = {name: [] for name in run_dirs}
    for name, run in run_dirs.items():
        found = sorted(p for p in (run / "adapters").glob("*") if (p / "adapter_config.json").is_file())
        out[name] += [(p.name, p) for p in found]
    by_path = {d.resolve(): name for name, d in run_dirs.items()}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r}: write NAME=DIR")
        src = adapter_dir(path)
        if len(run_dirs) == 1:
            parent = next(iter(run_dirs))
        else:
            base = read_adapter(src)[0].get("base_model_name_or_path") or ""
            parent = by_path.get(Path(base).resolve()) if base else None
            if parent is None:
                raise ConfigError(f"--adapter {spec!r}: its base ({base or 'not named'}) is none of the models served; "
                                  "serve it with its base model alone")
        out[parent].append((name, Path(path)))
    return out


def load_for_serving(run_dir: str | Path, dtype: torch.dtype = torch.float32) -> GPT:
    """A run's model as the server runs it: in `dtype`, its linear layers packed for inference
    (stoker.models.gpt.pack_linears), so no longer trainable."""
    model, _, _ = load_trained(run_dir)
    merge_lora(model)  # a LoRA run serves with its updates folded into the weights
    model = model.to(dtype)
    pack_linears(model)
    return model


class ModelPool:
    """Models by name; at most `max_loaded` engines resident (one more while an unloaded one
    finishes the requests it already accepted)."""

    def __init__(self, run_dirs: dict[str, Path], *, max_loaded: int = 1, metrics: ServeMetrics | None = None,
                 dtype: str = "fp32", adapters: dict[str, list[tuple[str, Path]]] | None = None,
                 max_adapters: int = 8, **engine_kwargs):
        if max_loaded < 1:
            raise ConfigError(f"--max-loaded: must be >= 1, got {max_loaded}")
        if max_adapters < 1:
            raise ConfigError(f"--max-adapters: must be >= 1, got {max_adapters}")
        self.max_adapters = max_adapters
        self.metrics = metrics or ServeMetrics()
        self.max_loaded = max_loaded
        self.engine_kwargs = engine_kwargs
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        self.models = {
            name: Model(name, Path(d), Tokenizer.load(d), json.loads((Path(d) / "model.json").read_text())["block_size"])
            for name, d in run_dirs.items()
        }
        for base, found in (adapters or {}).items():
            if not found:
                continue
            b = self.models[base]
            with torch.device("meta"):  # its shapes, to check each adapter against
                shapes = GPT(run_model_config(b.run_dir))
            for name, path in found:
                for spec in describe(shapes, name, path):
                    if spec.name in self.models:
                        raise ConfigError(f"adapter name {spec.name!r} is taken by another model or adapter")
                    b.adapters.append(spec)
                    self.models[spec.name] = Model(spec.name, b.run_dir, b.tokenizer, b.context - spec.virtual,
                                                   parent=base, adapter=spec, max_token_bytes=b.max_token_bytes)
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def get(self, name: str | None) -> Model:
        """The named model (the first one when None); UnknownModel lists the valid names."""
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise UnknownModel(name)
        return self.models[name]

    def submit(self, name: str, prompt_ids: Sequence[int], params: SamplingParams,
               on_event: Callable[[Event], None]) -> Handle:
        """Load the model if needed (blocking), then queue the request on its engine (an
        adapter's: on its base's, with the adapter)."""
        with self._lock:
            m = self.models[name]
            return self._engine(m).submit(prompt_ids, params, on_event, m.name if m.parent else None)

    def loaded(self, m: Model) -> bool:
        """Whether the model (an adapter's: its base) is resident."""
        return (self.models[m.parent] if m.parent else m).engine is not None

    def engine(self, name: str) -> Engine:
        with self._lock:
            return self._engine(self.models[name])

    def _engine(self, m: Model) -> Engine:
        m.last_used = time.monotonic()
        if m.parent:
            m = self.models[m.parent]
            m.last_used = time.monotonic()
        if m.engine is None:
            resident = sorted((x for x in self.models.values() if x.engine is not None), key=lambda x: x.last_used)
            for old in resident[: max(0, len(resident) + 1 - self.max_loaded)]:
                self._unload(old)
            model = load_for_serving(m.run_dir, self.dtype)
            bank = Adapters(model, m.adapters, self.max_adapters) if m.adapters else None
            m.engine = Engine(model, m.tokenizer, metrics=self.metrics.for_model(m.name), adapters=bank,
                              **self.engine_kwargs)
            m.loads += 1
            self.metrics.loads.labels(m.name).inc()
            self.metrics.loaded.labels(m.name).set(1)
        return m.engine

    def _unload(self, m: Model) -> None:
        # Requests it already accepted still finish; the weights go when its thread ends.
        m.engine.close(wait=False)
        m.engine = None
        self.metrics.loaded.labels(m.name).set(0)

    def close(self) -> None:
        with self._lock:
            engines = [m.engine for m in self.models.values() if m.engine is not None]
            for m in self.models.values():
                if m.engine is not None:
                    self._unload(m)
        for e in engines:
            e.close(wait=True)
