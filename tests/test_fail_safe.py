"""The programs' promise for bad input: exit status 2, one line on stderr naming the problem, and no file
written or changed, checked for each failure class over the programs it applies to (demo, text, evolve).

The programs run in this process through :func:`namm_transfer.cli.run_program` (as ``python -m`` does), so
each refused command costs milliseconds; the few cases that get as far as loading a model use the embedded
SmolLM2. Interrupts run as real processes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from namm_transfer import demo, text
from namm_transfer.cli import InputError, check_output_dir, check_readable_file, describe_error, run_program
from namm_transfer.evolve import __main__ as evolve
from namm_transfer.models import embedded_model_dir
from namm_transfer.namm.checkpoint import save_namm
from namm_transfer.namm.config import NammConfig
from namm_transfer.run_lock import RunLock

PROGRAMS = {"demo": demo, "text": text, "evolve": evolve}
OUTPUT_OPTION = {"text": "--out", "evolve": "--run-dir"}
# the cheapest work each program would do if a case were wrongly accepted
SMALL = {"demo": ["--length", "256"], "text": ["--tasks", "passkey", "--items", "1", "--length", "256"],
         "evolve": ["--population", "4", "--prompts-per-task", "1", "--pool-size", "1", "--length", "256",
                    "--update-every", "128", "--quiet"]}
DEFAULT_STAGE = ["--stage", "passkey:1"]  # evolve's, unless a case gives its own


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def refused(name: str, args: list[str], place: Path, capsys) -> str:
    """Run program ``name`` with ``args`` (its output under ``place``) and return its one error line, after
    checking exit status 2 and that nothing under ``place`` was written or changed."""
    argv = list(SMALL[name]) + list(args)
    if name == "evolve" and "--stage" not in args:
        argv += DEFAULT_STAGE
    if name in OUTPUT_OPTION and OUTPUT_OPTION[name] not in args:
        argv += [OUTPUT_OPTION[name], str(place / "out")]
    before = snapshot(place)
    capsys.readouterr()
    try:
        status = run_program(PROGRAMS[name].main, argv, interrupted=PROGRAMS[name].INTERRUPTED)
    except SystemExit as exit_:  # argparse refusals
        status = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    assert snapshot(place) == before, "a refused command wrote or changed files"
    return lines[0]


@pytest.fixture
def place(tmp_path, monkeypatch) -> Path:
    """An empty working folder (the demo's, and the parent of every output folder)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory) -> dict[str, Path]:
    """Model folders a user might pass by mistake: config only, and the weights file cut short."""
    source = embedded_model_dir()
    root = tmp_path_factory.mktemp("models")
    config_only = root / "config-only"
    config_only.mkdir()
    shutil.copy(source / "config.json", config_only)
    cut = root / "cut-weights"
    shutil.copytree(source, cut)
    (cut / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:4096])
    return {"config-only": config_only, "cut-weights": cut}


ALL = ["demo", "text", "evolve"]
WRITERS = ["text", "evolve"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("device, fragment", [("cuda", "without CUDA"), ("cuda:x", "not a device name"),
                                              ("tpu", "not a device name"), ("meta", "not supported")])
def test_devices_this_machine_lacks_or_malformed(name, device, fragment, place, capsys):
    assert fragment in refused(name, ["--device", device], place, capsys)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("args, fragment", [(["--length", "100000000"], "--length: 100000000 is out of range"),
                                            (["--length", "12x"], "not an integer"),
                                            (["--seed", "-1"], "--seed")])
def test_sizes_out_of_their_stated_bounds(name, args, fragment, place, capsys):
    if name == "evolve" and args[0] == "--seed":
        args = ["--seed", str(2**31)]
    assert fragment.replace("--seed", args[0]) in refused(name, args, place, capsys)


@pytest.mark.parametrize("name, args, fragment", [
    ("text", ["--items", "0"], "--items"), ("text", ["--update-every", "7"], "--update-every"),
    ("text", ["--ratios", "0.5,1.5"], "--ratios"), ("text", ["--depths", "nan"], "--depths"),
    ("text", ["--methods", "full,bogus"], "unknown bogus"), ("text", ["--tasks", ","], "no names given"),
    ("text", ["--split", "train", "--seed", "999999", "--items", "2"], "last train seed"),
    ("demo", ["--depth", "1.5"], "--depth"),
    ("evolve", ["--population", "2"], "--population"), ("evolve", ["--stage", "passkey:0"], "generations"),
    ("evolve", ["--stage", "haystack:2"], "unknown task"), ("evolve", ["--update-every", "100"], "update_every"),
    ("evolve", ["--prompts-per-task", "3"], "prompts_per_task"), ("evolve", ["--time-limit", "-5"], "--time-limit"),
])
def test_argument_and_cross_argument_rules(name, args, fragment, place, capsys):
    assert fragment in refused(name, args, place, capsys)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("model, fragment", [("/nonexistent/model", "no such folder"),
                                             ("nobody/not-cached", "not in the local Hugging Face cache"),
                                             ("config-only", "no weights"), ("cut-weights", "cannot load model")])
def test_models_that_cannot_load(name, model, fragment, broken_models, place, capsys):
    model = str(broken_models.get(model, model))
    line = refused(name, ["--model", model], place, capsys)
    assert fragment in line and model in line


@pytest.mark.parametrize("name", WRITERS)
def test_output_folders_that_cannot_be_written(name, place, capsys):
    (place / "a-file").write_text("not a folder")
    option = OUTPUT_OPTION[name]
    assert "is a file, expected a folder" in refused(name, [option, str(place / "a-file")], place, capsys)
    assert "so the folder cannot be created" in refused(name, [option, str(place / "a-file" / "run")], place, capsys)


def test_evolve_export_to_an_unwritable_place_is_refused_before_any_work(place, capsys):
    (place / "a-file").write_text("not a folder")
    line = refused("evolve", ["--export", str(place / "a-file" / "namm")], place, capsys)
    assert "--export" in line and "a-file" in line


@pytest.fixture
def namm_files(tmp_path) -> dict[str, Path]:
    """NAMM weights with one problem each: a config that omits settings, and a cut safetensors file."""
    folders = {}
    for problem in ("missing-keys", "cut"):
        folder = tmp_path / "namm-inputs" / problem
        save_namm(folder, torch.zeros(4172), torch.zeros(17), torch.ones(17), NammConfig(update_every=256), {})
        folders[problem] = folder
    sidecar = json.loads((folders["missing-keys"] / "namm.json").read_text())
    for key in ("update_every", "protect_sink", "protect_prompt_tail"):
        del sidecar["config"][key]
    (folders["missing-keys"] / "namm.json").write_text(json.dumps(sidecar))
    weights = folders["cut"] / "namm.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return folders


@pytest.mark.parametrize("name", ["demo", "text"])
def test_namm_files_name_the_file_and_the_problem(name, namm_files, place, capsys):
    line = refused(name, ["--namm", str(namm_files["missing-keys"])], place, capsys)
    assert "namm.json" in line and "lacks protect_sink, protect_prompt_tail, update_every" in line
    line = refused(name, ["--namm", str(namm_files["cut"])], place, capsys)
    assert "namm.safetensors" in line and "not a readable safetensors file" in line
    assert "nothing/namm.json: file not found" in refused(name, ["--namm", str(place / "nothing")], place, capsys)


def test_a_namm_whose_config_disagrees_with_the_run_is_refused(place, capsys):
    line = refused("text", ["--update-every", "128"], place, capsys)  # the shipped NAMM runs every 256 tokens
    assert "update_every 256 (asked: 128)" in line


def test_changed_run_identity_is_refused_naming_what_differs(place, capsys):
    run = place / "out"
    run.mkdir()
    config = {"model": None, "population": 4, "sigma0": 0.065, "init_score": 0.0, "full_covariance": False,
              "prompts_per_task": 1, "pool_size": 1, "length": 256, "members_per_batch": 8, "memory_weight": 0.0,
              "update_every": 128, "chunk_size": 128, "protect_prompt_tail": 0, "protect_sink": 0, "seed": 1337,
              "prompt_seed": 0, "dtype": "bfloat16", "stages": [[["passkey"], 1]]}
    (run / evolve.RUN_CONFIG).write_text(json.dumps(config))
    line = refused("evolve", ["--stage", "two_hop:2"], place, capsys)
    assert "stage 1 tasks (was passkey, now two_hop)" in line
    assert "length (was 256, now 512)" in refused("evolve", ["--length", "512"], place, capsys)
    folder = run / "builtin-heldout-L256__smollm2__full__full"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model": "another"}))
    line = refused("text", ["--namm", "none", "--methods", "full"], place, capsys)
    assert "was started with other settings" in line and "model (was \"another\", now \"smollm2\")" in line


@pytest.mark.parametrize("name", WRITERS)
def test_a_folder_in_use_by_another_process_is_refused(name, place, capsys):
    with RunLock(place / "out"):
        line = refused(name, [], place, capsys)
    assert "in use by another process" in line and str(os.getpid()) in line


def test_damaged_run_files_are_named(place, capsys):
    run = place / "out"
    run.mkdir()
    (run / "references.jsonl").write_text('{"item_id": "a", "score": 1.0}\n{"item_id": "b", "sc\n{"item_id": "c"}\n')
    assert "references.jsonl:2: corrupt line" in refused("evolve", [], place, capsys)


def test_longbench_files_that_hold_nothing_or_are_not_utf8(place, capsys):
    data = place / "longbench"
    data.mkdir()
    (data / "passage_retrieval_en.jsonl").write_text("\n")
    assert "hold no items" in refused("text", ["--longbench", str(data)], place, capsys)
    (data / "passage_retrieval_en.jsonl").write_bytes(b'{"input": "caf\xe9"}\n')
    line = refused("text", ["--longbench", str(data)], place, capsys)
    assert "passage_retrieval_en.jsonl:1: not UTF-8" in line
    assert "no trec.jsonl" in refused("text", ["--longbench", str(data), "--longbench-tasks", "trec"], place, capsys)


@pytest.mark.parametrize("error, fragment", [
    (OSError(errno.EROFS, "Read-only file system", "/x/out"), "/x/out: read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/x/out"), "/x/out: permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "/x/out/log.jsonl"), "log.jsonl: no space left"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/x/out"), "/x/out: is a folder"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/f/out"), "is a file, not a folder"),
    (SafetensorError("Error while deserializing header: MetadataIncompleteBuffer"), "not a readable safetensors"),
    (AssertionError("Torch not compiled with CUDA enabled"), "device error"),
    (RuntimeError("Expected one of cpu, cuda, mps device type at start of device string: cuda:x"), "check --device"),
    (MemoryError(), "out of memory"),
    (json.JSONDecodeError("Expecting value", "{", 0), "Expecting value"),
])
def test_expected_failures_map_to_one_line(error, fragment):
    line = describe_error(error)
    assert fragment in line and "\n" not in line


@pytest.mark.parametrize("bug", [KeyError("x"), IndexError("list index out of range"), RuntimeError("shape mismatch")])
def test_bugs_keep_their_traceback(bug):
    assert describe_error(bug) is None

    def main(argv):
        raise bug

    with pytest.raises(type(bug)):
        run_program(main, [])


def test_output_checks_create_nothing_and_count_free_space(tmp_path):
    before = snapshot(tmp_path)
    assert check_output_dir(tmp_path / "new" / "run", "--out") == tmp_path / "new" / "run"
    assert snapshot(tmp_path) == before
    with pytest.raises(InputError, match="MiB free on its file system"):
        check_output_dir(tmp_path, "--out", need_bytes=2**62)
    with pytest.raises(InputError, match="is a folder, expected a file"):
        check_readable_file(tmp_path, "--data")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(InputError, match="permission denied"):
        check_output_dir(locked / "run", "--out")


@pytest.mark.parametrize("name", ALL)
def test_interrupt_says_truthfully_what_was_saved(name, place, capsys, monkeypatch):
    """Ctrl-C (a KeyboardInterrupt) while the first prompt is being answered: exit status 130, the program's
    own line as the last one, and nothing on disk that a rerun of the same command would refuse."""
    from namm_transfer.text_eval import TextGenerator

    def interrupted_answer(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TextGenerator, "run", interrupted_answer)
    argv = [*SMALL[name], *(DEFAULT_STAGE if name == "evolve" else [])]
    if name in OUTPUT_OPTION:
        argv += [OUTPUT_OPTION[name], str(place / "out")]
    capsys.readouterr()
    status = run_program(PROGRAMS[name].main, argv, interrupted=PROGRAMS[name].INTERRUPTED)
    err = capsys.readouterr().err
    assert status == 130 and err.strip().splitlines()[-1] == PROGRAMS[name].INTERRUPTED, err[-2000:]
    written = sorted(str(p.relative_to(place)) for p in place.rglob("*") if p.is_file())
    assert written == {"demo": [], "text": ["out/.lock"], "evolve": ["out/.lock", "out/run_config.json"]}[name]
