"""Names for the training libraries' own checkpoints (:mod:`optckpt.hf_names`, the alignment of
several optimizers in :mod:`optckpt.names`), checked against the libraries themselves.

A transformers Trainer folder is named from its ``config.json`` (the model built on the meta
device): the names must be the real model's ``named_parameters()`` in the groups the real
``Trainer.create_optimizer()`` builds. Each optimizer of a Lightning GAN is named from the
file's ``state_dict``: the names must be those of the parameters its ``configure_optimizers``
gives each optimizer. The truth comes from the libraries, in processes of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from optckpt.cli.app import app

from .conftest import TrainingOutputs
from .training import SCRIPT, _env

pytestmark = pytest.mark.slow
runner = CliRunner()

# The real optimizers' groups, as parameter names: each library builds its model and
# optimizers as the producers did (tests/real/training.py), and each parameter is named by
# its object in the model's named_parameters().
_TRUTH = """
import json, pathlib, sys
sys.path.insert(0, {folder!r})
import training
def names(model, optimizers):
    by_object = {{id(p): n for n, p in model.named_parameters()}}
    return [[[by_object[id(p)] for p in g["params"]] for g in o.param_groups] for o in optimizers]
trainer = training._trainer(pathlib.Path(sys.argv[1]))
module = training._lightning_module()()
print(json.dumps({{
    "trainer": names(trainer.model, [trainer.create_optimizer()]),
    "lightning": names(module, module.configure_optimizers()[0]),
}}))
"""


@pytest.fixture(scope="module")
def real_groups(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[list[list[str]]]]:
    """Per library, per optimizer, per group: the names of the parameters it put there."""
    scratch = tmp_path_factory.mktemp("truth")
    done = subprocess.run(
        [sys.executable, "-c", _TRUTH.format(folder=str(SCRIPT.parent)), str(scratch)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    found: dict[str, list[list[list[str]]]] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def inspect_json(path: Path, *args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["inspect", str(path), "--json", *args])
    assert result.exit_code == 0, result.output
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def named_groups(optimizer: dict[str, Any]) -> list[list[str | None]]:
    """The names inspect gives, group by group in ID order."""
    groups: list[list[str | None]] = [[] for _ in optimizer["param_groups"]]
    for p in optimizer["params"]:
        groups[p["group"]].append(p["name"])
    return groups


@pytest.fixture
def trainer_copy(training_outputs: TrainingOutputs, tmp_path: Path) -> Path:
    """A copy of the Trainer's checkpoint-2 to change (the session's outputs stay as made)."""
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(training_outputs.trainer / "checkpoint-2", copy)
    return copy


def edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# --- transformers Trainer ------------------------------------------------------------------------


def test_trainer_names_are_the_trainers_groups(
    training_outputs: TrainingOutputs, real_groups: dict[str, Any]
) -> None:
    report = inspect_json(training_outputs.trainer / "checkpoint-2")
    (optimizer,) = report["optimizers"]
    assert optimizer["names_source"] == "model config"
    (truth,) = real_groups["trainer"]
    assert [len(g) for g in truth] == [6, 10]  # weight decay and none: the rule matters
    assert named_groups(optimizer) == truth
    # Every parameter once, the tied lm_head.weight under its first name only.
    names = [p["name"] for p in optimizer["params"]]
    assert len(set(names)) == len(names) and "lm_head.weight" not in names
    # The output_dir reads its newest checkpoint-N, named the same way.
    from_output_dir = inspect_json(training_outputs.trainer)["optimizers"][0]
    assert from_output_dir["names_source"] == "model config"
    assert named_groups(from_output_dir) == truth


def _tiny(kind: str) -> Any:
    """A tiny model of another architecture, built by transformers from a config."""
    import transformers as hf

    tiny: dict[str, Any] = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 40,
    }
    if kind == "llama":  # no biases, RMSNorm, untied head
        return hf.LlamaForCausalLM(hf.LlamaConfig(**tiny, num_key_value_heads=1))
    if kind == "bert":  # pooler and a classification head
        return hf.BertForSequenceClassification(hf.BertConfig(**tiny))
    config = hf.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=40)
    return hf.T5ForConditionalGeneration(config)  # encoder-decoder, shared embedding tied


@pytest.mark.parametrize("kind", ["llama", "bert", "t5"])
def test_other_architectures_are_built_as_transformers_builds_them(
    kind: str, tmp_path: Path
) -> None:
    from optckpt.hf_names import config_model

    model = _tiny(kind)
    model.save_pretrained(tmp_path)
    built, note = config_model(tmp_path, len(list(model.parameters())))
    assert note is None and built is not None
    assert list(built.params) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def test_resume_step_uses_the_folders_weights_by_name(training_outputs: TrainingOutputs) -> None:
    folder = training_outputs.trainer / "checkpoint-2"
    for path, args in (
        (folder, []),
        (folder, ["--model", str(folder / "model.safetensors")]),
        (training_outputs.trainer, []),  # the output_dir: its newest checkpoint-N
    ):
        result = runner.invoke(app, ["resume-step", str(path), "--json", *args])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["ok"]
        assert str(folder / "model.safetensors") in report["params_from"]
        assert "config.json" in report["params_from"]


def test_a_folder_with_pytorch_model_bin(trainer_copy: Path) -> None:
    # What save_pretrained wrote before safetensors (transformers 4, save_safetensors=False):
    # torch.save of the state dict, which transformers still loads.
    from safetensors.torch import load_file

    weights = load_file(trainer_copy / "model.safetensors")
    torch.save(weights, trainer_copy / "pytorch_model.bin")
    (trainer_copy / "model.safetensors").unlink()
    result = runner.invoke(app, ["resume-step", str(trainer_copy), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "pytorch_model.bin" in report["params_from"] and "config.json" in report["params_from"]


def test_unknown_architecture_gives_no_names_and_a_note(trainer_copy: Path) -> None:
    edit_config(trainer_copy, architectures=["NoSuchModelForCausalLM"])
    report = inspect_json(trainer_copy)
    assert report["optimizers"][0]["names_source"] is None
    assert {p["name"] for p in report["optimizers"][0]["params"]} == {None}
    assert any("NoSuchModelForCausalLM" in note for note in report["notes"])
    # resume-step falls back to stand-ins (the weights cannot be matched without names).
    result = runner.invoke(app, ["resume-step", str(trainer_copy), "--json"])
    assert result.exit_code == 0, result.output
    assert "stand-ins" in json.loads(result.stdout)["params_from"]
    # --model sorted by name, nothing to name it with: a usage error, not a remap hint.
    result = runner.invoke(
        app, ["resume-step", str(trainer_copy), "--model", str(trainer_copy / "model.safetensors")]
    )
    assert result.exit_code == 2
    assert "sorted by name" in result.stderr and "NoSuchModelForCausalLM" in result.stderr
    # A model_type transformers does not know, and a class of another model_type: refused too.
    for changes, needle in (
        ({"model_type": "no_such_type"}, "knows no model_type 'no_such_type'"),
        ({"architectures": ["BertForMaskedLM"]}, "no model class 'BertForMaskedLM' for 'gpt2'"),
    ):
        edit_config(trainer_copy, **{"model_type": "gpt2", **changes})
        report = inspect_json(trainer_copy)
        assert report["optimizers"][0]["names_source"] is None
        assert any(needle in note for note in report["notes"]), report["notes"]


def test_custom_code_is_never_run(trainer_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    (trainer_copy / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass EvilModel: pass\nclass EvilConfig: pass\n"
    )
    edit_config(
        trainer_copy,
        model_type="evil",
        architectures=["EvilModel"],
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    )
    report = inspect_json(trainer_copy)
    result = runner.invoke(app, ["resume-step", str(trainer_copy), "--json"])
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert report["optimizers"][0]["names_source"] is None
    assert any("auto_map" in note for note in report["notes"])
    # A known model_type with auto_map is refused too: the code it names would be imported.
    edit_config(trainer_copy, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    report = inspect_json(trainer_copy)
    assert report["optimizers"][0]["names_source"] is None and not marker.exists()


_WITHOUT_TRANSFORMERS = """
import sys
sys.modules["transformers"] = None  # import transformers raises ImportError
from optckpt.cli.app import main
sys.argv = ["optckpt", "inspect", "--json", sys.argv[1]]
main()
"""

_IMPORTS_AFTER = """
import sys
from optckpt.cli.app import main
sys.argv = ["optckpt", "inspect", sys.argv[1]]
try:
    main()
finally:
    print("transformers imported:", "transformers" in sys.modules, file=sys.stderr)
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**_env(), "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_without_transformers_a_note_says_how_to_get_names(
    training_outputs: TrainingOutputs,
) -> None:
    result = _python(_WITHOUT_TRANSFORMERS, str(training_outputs.trainer / "checkpoint-2"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["optimizers"][0]["names_source"] is None
    assert any("pip install 'optckpt[hf]'" in note for note in report["notes"])


def test_transformers_is_not_imported_for_other_inputs(
    training_outputs: TrainingOutputs,
) -> None:
    # A Trainer folder imports it (test_without_transformers_... shows it is asked for).
    result = _python(_IMPORTS_AFTER, str(training_outputs.lightning))
    assert result.returncode == 0, result.stderr
    assert "transformers imported: False" in result.stderr


# --- Lightning -----------------------------------------------------------------------------------


def test_each_lightning_optimizer_is_named(
    training_outputs: TrainingOutputs, real_groups: dict[str, Any]
) -> None:
    report = inspect_json(training_outputs.lightning)
    truth = real_groups["lightning"]
    assert [o["key"] for o in report["optimizers"]] == ["optimizer_states.0", "optimizer_states.1"]
    assert [named_groups(o) for o in report["optimizers"]] == truth
    assert all(o["names_source"] == "recovered" for o in report["optimizers"])
    # One optimizer alone (--key) is named the same way: the others still constrain it.
    alone = inspect_json(training_outputs.lightning, "--key", "optimizer_states.1")
    assert named_groups(alone["optimizers"][0]) == truth[1]


def test_hyper_parameters_survive_every_writing_command(
    training_outputs: TrainingOutputs, tmp_path: Path
) -> None:
    source = training_outputs.lightning
    loaded = torch.load(source, weights_only=True)
    saved = loaded["hyper_parameters"]
    assert saved  # the module saved its hyperparameters
    as_safetensors = tmp_path / "gan.safetensors"
    # The discriminator as it is: remap names its optimizer's IDs (aligned with the other).
    layout = tmp_path / "discriminator.json"
    params = {
        n: {"shape": list(t.shape), "dtype": "float32"}
        for n, t in loaded["state_dict"].items()
        if n.startswith("discriminator.")
    }
    layout.write_text(json.dumps({"params": params, "groups": [{"params": list(params)}]}))
    commands = {
        "convert": ["convert", str(source), "-o", str(as_safetensors)],
        "convert back": ["convert", str(as_safetensors), "-o", str(tmp_path / "back.ckpt")],
        "move": ["move", str(source), "--device", "cpu", "--dtype", "float64", "-o"],
        "resume-step": ["resume-step", str(source), "--key", "optimizer_states.1", "-o"],
        "remap": ["remap", str(source), "--key", "optimizer_states.1", "--to", str(layout), "-o"],
    }
    for name, args in commands.items():
        out = tmp_path / f"{name.replace(' ', '-')}.ckpt"
        argv = [*args, str(out)] if args[-1] == "-o" else args
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, (name, result.output)
    for written in ("back.ckpt", "move.ckpt", "resume-step.ckpt", "remap.ckpt"):
        loaded = torch.load(tmp_path / written, weights_only=True)
        assert loaded["hyper_parameters"] == saved, written
        assert type(loaded["hyper_parameters"]) is type(saved), written
    # remap named the discriminator's optimizer as its own parameters, in the same order.
    remapped = torch.load(tmp_path / "remap.ckpt", weights_only=True)["optimizer_states"][1]
    assert remapped["param_groups"][0]["param_names"] == list(params)
    before = loaded["optimizer_states"][1]["state"]
    assert all(
        torch.equal(remapped["state"][i]["momentum_buffer"], before[i]["momentum_buffer"])
        for i in before
    )
    # The names survive the round trip too, and inspect shows the hyperparameters.
    report = inspect_json(tmp_path / "back.ckpt")
    assert [o["names_source"] for o in report["optimizers"]] == ["recovered", "recovered"]
    (trainer,) = [c for c in report["companions"] if c["kind"] == "trainer"]
    assert trainer["summary"]["hyper_parameters"] == dict(saved)


def test_a_config_of_a_huge_model_stops_building(tmp_path: Path) -> None:
    # a hostile config.json: a billion layers would build for hours, even on the meta device
    import time

    import transformers as hf

    from optckpt.hf_names import config_model

    config = hf.GPT2Config(n_layer=10**9, n_embd=8, n_head=2, vocab_size=10)
    config.architectures = ["GPT2LMHeadModel"]
    config.to_json_file(tmp_path / "config.json")
    start = time.monotonic()
    built, note = config_model(tmp_path, 6)
    assert built is None and "building stopped" in (note or "")
    assert time.monotonic() - start < 60


def test_a_model_class_transformers_maps_but_cannot_import_gives_a_note(tmp_path: Path) -> None:
    import transformers as hf

    from optckpt.hf_names import config_model

    arch = "VoxtralRealtimeTextModel"  # in MODEL_MAPPING_NAMES of transformers 5.24, not exported
    if hasattr(hf, arch):
        pytest.skip(f"transformers {hf.__version__} exports {arch}")
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "voxtral_realtime_text", "architectures": [arch]})
    )
    built, note = config_model(tmp_path, 6)
    assert built is None and f"cannot import its model class '{arch}'" in (note or "")
