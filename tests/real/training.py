"""Training folders and checkpoints written by the real training libraries, and resumed by them.

Run as a script (``python training.py KIND OUT``), one process per producer, so each library's
global state (seeds, environment, process groups, logging) never leaks into the test process:

* ``trainer``: a transformers ``Trainer`` run of a tiny GPT-2 built from a config (no download),
  2 steps, a checkpoint every step: ``OUT/checkpoint-1/``, ``OUT/checkpoint-2/`` (model
  safetensors, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``).
* ``accelerate``: ``Accelerator.save_state`` of two models, two optimizers (AdamW, SGD with
  momentum) and a StepLR: ``OUT/`` holds ``model.safetensors``, ``model_1.safetensors``,
  ``optimizer.bin``, ``optimizer_1.bin``, ``scheduler.bin``, ``random_states_0.pkl``.
* ``lightning``: a Lightning ``Trainer`` run of a GAN-like module with two optimizers (manual
  optimization) and a StepLR on the first: ``OUT`` is the ``.ckpt`` file.

``resume-trainer CKPT_DIR``, ``resume-accelerate DIR`` and ``resume-lightning CKPT`` load a
folder or file back with the library that wrote it and take one more training step; they exit 0
and print ``resumed`` when that worked. Tests run them on what optckpt wrote.

:func:`produce` runs several producers at once (they are independent processes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

SCRIPT = Path(__file__)

# Keep the libraries quiet and offline: no download, no telemetry, no tokenizer threads.
_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PL_DISABLE_FORK": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "OMP_NUM_THREADS": "1",
}


def _env() -> dict[str, str]:
    return {**os.environ, **_ENV}


def produce(jobs: Iterable[tuple[str, Path]], timeout: float = 300) -> None:
    """Run producer ``kind`` for each ``(kind, out)``, all at once; raise if one fails."""
    running = [
        (
            kind,
            subprocess.Popen(
                [sys.executable, str(SCRIPT), kind, str(out)],
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            ),
        )
        for kind, out in jobs
    ]
    failures = []
    for kind, process in running:
        output, _ = process.communicate(timeout=timeout)
        if process.returncode != 0:
            failures.append(f"{kind} exited {process.returncode}:\n{output.decode()[-4000:]}")
    if failures:
        raise RuntimeError("\n".join(failures))


def resume(kind: str, path: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Load ``path`` with the library that wrote it (``kind``: ``trainer``, ``accelerate``,
    ``lightning``) and take a step, in a process of its own."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), f"resume-{kind}", str(path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- transformers Trainer ----------------------------------------------------------------------

TRAINER_CONFIG = {"n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 32, "n_positions": 16}


class _Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, TRAINER_CONFIG["vocab_size"], (n, 8), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(out: Path, max_steps: int = 2) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TRAINER_CONFIG))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        save_steps=1,
        save_strategy="steps",
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.1,
        warmup_steps=1,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=_Tokens())


def make_trainer(out: Path) -> None:
    _trainer(out).train()


def resume_trainer(checkpoint: Path) -> None:
    # One step past the checkpoint's: Trainer loads model, optimizer, scheduler and counters.
    import json

    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    with __import__("tempfile").TemporaryDirectory() as scratch:
        _trainer(Path(scratch), max_steps=step + 1).train(resume_from_checkpoint=str(checkpoint))


# --- accelerate --------------------------------------------------------------------------------


def _accelerate_objects() -> tuple[Any, list[Any]]:
    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    first = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    second = nn.Linear(2, 3)
    opt_first = torch.optim.AdamW(first.parameters(), lr=1e-2, weight_decay=0.1)
    opt_second = torch.optim.SGD(second.parameters(), lr=1e-2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt_first, step_size=1, gamma=0.5)
    objects = accelerator.prepare(first, second, opt_first, opt_second, scheduler)
    return accelerator, list(objects)


def _accelerate_step(objects: list[Any]) -> None:
    first, second, opt_first, opt_second, scheduler = objects
    loss = second(first(torch.randn(5, 4))).pow(2).mean()
    loss.backward()
    opt_first.step()
    opt_second.step()
    scheduler.step()
    opt_first.zero_grad()
    opt_second.zero_grad()


def make_accelerate(out: Path) -> None:
    accelerator, objects = _accelerate_objects()
    for _ in range(2):
        _accelerate_step(objects)
    accelerator.save_state(str(out), safe_serialization=True)


def resume_accelerate(folder: Path) -> None:
    accelerator, objects = _accelerate_objects()
    accelerator.load_state(str(folder))
    _accelerate_step(objects)


# --- Lightning ---------------------------------------------------------------------------------


def _lightning_module() -> Any:
    import pytorch_lightning as pl

    class Gan(pl.LightningModule):  # type: ignore[misc]
        """Two optimizers over two subsets of the modules, stepped by hand."""

        def __init__(self, width: int = 8) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.automatic_optimization = False
            self.generator = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 4))
            self.discriminator = nn.Sequential(
                nn.Linear(4, width), nn.LayerNorm(width), nn.Linear(width, 1)
            )

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt_g, opt_d = self.optimizers()
            (x,) = batch
            loss_g = self.discriminator(self.generator(x)).mean()
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()
            loss_d = self.discriminator(x).pow(2).mean()
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
            self.lr_schedulers().step()

        def configure_optimizers(self) -> Any:
            opt_g = torch.optim.Adam(self.generator.parameters(), lr=1e-2, betas=(0.5, 0.999))
            opt_d = torch.optim.SGD(self.discriminator.parameters(), lr=1e-2, momentum=0.9)
            scheduler = torch.optim.lr_scheduler.StepLR(opt_g, step_size=1, gamma=0.5)
            return [opt_g, opt_d], [scheduler]

    return Gan


def _lightning_trainer(max_steps: int) -> Any:
    import pytorch_lightning as pl

    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _lightning_data() -> Any:
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4, generator=generator))
    return torch.utils.data.DataLoader(data, batch_size=4)


def make_lightning(out: Path) -> None:
    torch.manual_seed(0)
    trainer = _lightning_trainer(max_steps=2)
    trainer.fit(_lightning_module()(), _lightning_data())
    trainer.save_checkpoint(str(out))


def resume_lightning(checkpoint: Path) -> None:
    # Lightning's max_steps counts optimizer steps: 2 per batch here (manual optimization).
    step = torch.load(checkpoint, weights_only=False)["global_step"]
    trainer = _lightning_trainer(max_steps=step + 2)
    trainer.fit(_lightning_module()(), _lightning_data(), ckpt_path=str(checkpoint))
    if trainer.global_step <= step:
        raise SystemExit(f"Lightning took no step: global_step {trainer.global_step}")


def main(kind: str, path: str) -> None:
    """Run producer or resumer ``kind`` on ``path``."""
    actions = {
        "trainer": make_trainer,
        "accelerate": make_accelerate,
        "lightning": make_lightning,
        "resume-trainer": resume_trainer,
        "resume-accelerate": resume_accelerate,
        "resume-lightning": resume_lightning,
    }
    actions[kind](Path(path))
    print("resumed" if kind.startswith("resume-") else "produced")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
