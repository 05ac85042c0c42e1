"""CLI paths of diff, move and convert: exit codes, stdout, the one-line stderr, nothing left behind."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from checks import assert_one_line_error, run

FIXTURES = Path(__file__).resolve().parent.parent.parent / "fixtures"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# diff -------------------------------------------------------------------------------------


def test_diff_identical_exits_0_with_one_line() -> None:
    result = run("diff", FIXTURES / "adamw_train.pt", FIXTURES / "adamw_train.safetensors")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "identical (bitwise)"


def test_diff_different_exits_1_with_a_table(tmp_path: Path) -> None:
    sd = torch.load(FIXTURES / "sgd_momentum_bare.pt", weights_only=True)
    other = copy.deepcopy(sd)
    other["param_groups"][0]["lr"] = 0.5
    other["state"][0]["momentum_buffer"] += 1
    torch.save(other, tmp_path / "b.pt")
    result = run("diff", FIXTURES / "sgd_momentum_bare.pt", tmp_path / "b.pt")
    assert result.exit_code == 1
    assert "hyperparam" in result.stdout and "group 0.lr" in result.stdout
    assert "ID 0.momentum_buffer" in result.stdout
    assert "2 differences" in result.stdout

    as_json = run("diff", FIXTURES / "sgd_momentum_bare.pt", tmp_path / "b.pt", "--json")
    assert as_json.exit_code == 1
    data = json.loads(as_json.stdout)
    assert data["ok"] is False
    assert {d["kind"] for d in data["pairs"][0]["differences"]} == {"hyperparam", "values"}

    close = run("diff", FIXTURES / "sgd_momentum_bare.pt", tmp_path / "b.pt", "--atol", "2")
    assert close.exit_code == 1  # lr still differs
    assert "values" not in close.stdout


def test_diff_json_ok_when_identical() -> None:
    path = str(FIXTURES / "lightning.ckpt")
    result = run("diff", path, path, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["ok"] is True


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["diff", "missing.pt", str(FIXTURES / "adamw_train.pt")], 3, "no such file"),
        (
            ["diff", str(FIXTURES / "adamw_train.pt"), str(FIXTURES / "unsafe_namespace.pt")],
            3,
            "argparse.Namespace",
        ),
        (
            [
                "diff",
                str(FIXTURES / "adamw_train.pt"),
                str(FIXTURES / "lightning.ckpt"),
                "--key-b",
                "x",
            ],
            2,
            "'optimizer_states.0'",
        ),
    ],
)
def test_diff_errors(args: list[str], code: int, needle: str) -> None:
    result = run(*args)
    assert result.exit_code == code
    assert_one_line_error(result.stderr, needle)


# convert ----------------------------------------------------------------------------------


def test_convert_there_and_back(tmp_path: Path) -> None:
    source = FIXTURES / "lightning.ckpt"
    before = _sha(source)
    result = run("convert", source, "-o", tmp_path / "l.safetensors")
    assert result.exit_code == 0, result.stderr
    assert "safetensors" in result.stdout
    back = run("convert", tmp_path / "l.safetensors", "-o", tmp_path / "l.ckpt", "--format", "pt")
    assert back.exit_code == 0, back.stderr
    assert back.stderr == ""
    assert run("diff", source, tmp_path / "l.ckpt").exit_code == 0
    loaded = torch.load(tmp_path / "l.ckpt", weights_only=True)
    assert loaded["pytorch-lightning_version"] == "2.4.0" and loaded["global_step"] == 2
    assert _sha(source) == before


def test_convert_to_is_a_deprecated_alias_of_format(tmp_path: Path) -> None:
    """`--to` names a layout everywhere else: in convert it still works, with a note."""
    source = str(FIXTURES / "adamw_train.pt")
    result = run("convert", source, "-o", tmp_path / "a.x", "--to", "pt")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == (
        "note: --to is deprecated in convert; use --format (--to names a layout in remap)\n"
    )
    assert "optimizer" in torch.load(tmp_path / "a.x", weights_only=True)
    as_json = run("convert", source, "-o", tmp_path / "b.x", "--to", "safetensors", "--json")
    assert as_json.exit_code == 0, as_json.stderr
    assert as_json.stderr == ""
    data = json.loads(as_json.stdout)
    assert data["format"] == "safetensors"
    assert data["notes"] == [
        "--to is deprecated in convert; use --format (--to names a layout in remap)"
    ]
    both = run("convert", source, "-o", tmp_path / "c.x", "--to", "pt", "--format", "dcp")
    assert both.exit_code == 2
    assert_one_line_error(both.stderr, "disagree")


def test_convert_json(tmp_path: Path) -> None:
    out = tmp_path / "a.safetensors"
    result = run("convert", FIXTURES / "adamw_train.pt", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == {
        "source": str(FIXTURES / "adamw_train.pt"),
        "source_format": "torch",
        "out": str(out),
        "format": "safetensors",
        "bytes": out.stat().st_size,
        "optimizer": None,
        "rewritten": [],
        "keying": None,
        "rekeyed": [],
        "notes": [],
    }


def test_convert_refuses_input_and_existing_output(tmp_path: Path) -> None:
    source = tmp_path / "a.pt"
    source.write_bytes((FIXTURES / "adamw_train.pt").read_bytes())
    same = run("convert", source, "-o", source)
    assert same.exit_code == 2
    assert_one_line_error(same.stderr, "is the input")
    existing = tmp_path / "b.safetensors"
    existing.write_bytes(b"precious")
    refused = run("convert", source, "-o", existing)
    assert refused.exit_code == 2
    assert_one_line_error(refused.stderr, "--force")
    assert existing.read_bytes() == b"precious"
    forced = run("convert", source, "-o", existing, "--force")
    assert forced.exit_code == 0
    assert existing.read_bytes() != b"precious"


def test_convert_incompatible_optimizer_exits_4(tmp_path: Path) -> None:
    result = run(
        "convert",
        FIXTURES / "sgd_momentum_bare.pt",
        "-o",
        tmp_path / "x.pt",
        "--optimizer",
        "adamw",
    )
    assert result.exit_code == 4
    assert_one_line_error(result.stderr, "compatible targets")
    assert list(tmp_path.iterdir()) == []


def test_convert_unreadable_exits_3_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes((FIXTURES / "adamw_train.pt").read_bytes()[:500])
    result = run("convert", bad, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 3
    assert_one_line_error(result.stderr, "truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_convert_failing_midway_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    import optckpt.io.runs

    src = tmp_path / "src.pt"  # storages large enough to be copied in the kernel
    torch.save({f"t{i}": torch.full((600_000,), float(i)) for i in range(3)}, src)
    folder = tmp_path / "out"
    folder.mkdir()
    written: list[int] = []
    real_copy = optckpt.io.runs.copy_range

    def disk_full_on_second_tensor(src: int, offset: int, dst: int, nbytes: int) -> int:
        written.append(sum(p.stat().st_size for p in folder.iterdir()))
        if len(written) > 1:
            raise OSError(28, "No space left on device")
        return real_copy(src, offset, dst, nbytes)

    # the storages of the input are copied in the kernel one by one: fail mid-file
    monkeypatch.setattr(optckpt.io.runs, "copy_range", disk_full_on_second_tensor)
    out = folder / f"o{suffix}"
    result = run("convert", src, "-o", out)
    assert result.exit_code == 3
    assert_one_line_error(result.stderr, f"cannot write {out}: No space left on device")
    assert len(written) > 1 and written[1] > written[0] > 0, "fail after part of the file"
    assert list(folder.iterdir()) == []


# move -------------------------------------------------------------------------------------


def test_move_to_bfloat16(tmp_path: Path) -> None:
    result = run(
        "move",
        FIXTURES / "cuda_adam.pt",
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
        "-o",
        tmp_path / "m.pt",
    )
    assert result.exit_code == 0, result.stderr
    assert "bfloat16" in result.stdout
    # the model weights were not asked to move: they stay saved on cuda:0, and a note says so
    assert "note:" not in result.stdout
    assert result.stderr.startswith("note: the rest of the file stays saved on cuda:0 ")
    saved = torch.load(tmp_path / "m.pt", weights_only=True, map_location="cpu")
    state = saved["optimizer"]["state"]
    assert all(
        s["exp_avg"].dtype == torch.bfloat16 and s["step"].dtype == torch.float32
        for s in state.values()
    )


def test_move_json_carries_the_note(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    result = run("move", FIXTURES / "cuda_adam.pt", "--device", "cpu", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    data = json.loads(result.stdout)
    assert data == {
        "out": str(out),
        "bytes": out.stat().st_size,
        "device": "cpu",
        "dtype": None,
        "optimizers": ["optimizer"],
        "all_tensors": False,
        "kept_on": ["cuda:0"],
        "notes": [data["notes"][0]],
    }
    assert data["notes"][0].startswith("the rest of the file stays saved on cuda:0 ")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--device", "nowhere"], "not a device"),
        (["--device", "cpu", "--dtype", "int8"], "bfloat16"),
        ([], "needs --device, --dtype or both"),
    ],
)
def test_move_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    result = run("move", FIXTURES / "adamw_train.pt", *args, "-o", tmp_path / "m.pt")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, needle)
    assert list(tmp_path.iterdir()) == []


def test_move_dtype_only_keeps_every_saved_device(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    result = run("move", FIXTURES / "cuda_adam.pt", "--dtype", "bfloat16", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["device"], data["dtype"], data["kept_on"], data["notes"]) == (
        None,
        "bfloat16",
        [],
        [],
    )
    text = run("move", FIXTURES / "cuda_adam.pt", "--dtype", "float64", "-o", out, "--force")
    assert text.exit_code == 0, text.stderr
    assert "cast to float64, on the devices it was saved from" in text.stdout


def test_move_to_missing_cuda_is_one_line(tmp_path: Path) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"  # cuda:0 without CUDA, one past the last with
    result = run("move", FIXTURES / "adamw_train.pt", "--device", missing, "-o", tmp_path / "m.pt")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "no such device", missing)
    assert list(tmp_path.iterdir()) == []


def test_move_needs_output() -> None:
    result = run("move", FIXTURES / "adamw_train.pt", "--device", "cpu")
    assert result.exit_code == 2
