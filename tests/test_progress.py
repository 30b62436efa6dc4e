"""Progress of the long stages (abscot_jax/progress.py): plain lines at the configured interval
when stdout is not a terminal, a bar that leaves the summary line on one, the real uses (the JAX
engine's sampling, a training phase, the conversions), and Ctrl-C in a command-line tool."""
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from abscot_jax.progress import Progress, amount

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_come_every_n_items_or_after_the_interval_whichever_first():
    out, clock = io.StringIO(), FakeClock()
    bar = Progress("phase_a", 10, unit="steps", stream=out, every=3, seconds=30, clock=clock)
    for _ in range(7):  # one step a second: lines at steps 3 and 6
        clock.now += 1
        bar.update(1, loss=0.5)
    clock.now += 30  # no step for 30 s: the next update, even of 0, is due by time
    bar.update(0)
    clock.now += 1  # neither 3 steps nor 30 s since the last line: nothing
    bar.update(1)
    bar.close(loss="2.0000 -> 0.5000")
    assert out.getvalue().splitlines() == [
        # 3 steps in 3 s: 1 step/s, 7 to go
        "phase_a: 3/10 steps (30%), 1.00 steps/s, 3s elapsed, ETA 7s; loss 0.5",
        "phase_a: 6/10 steps (60%), 1.00 steps/s, 6s elapsed, ETA 4s; loss 0.5",
        # 7 steps in 37 s: 0.189 steps/s, 3 to go in 15.9 s
        "phase_a: 7/10 steps (70%), 0.19 steps/s, 37s elapsed, ETA 16s; loss 0.5",
        "phase_a: done, 8 steps in 38s (0.21 steps/s); loss 2.0000 -> 0.5000",
    ]


def test_a_resumed_count_reports_the_rate_of_this_attempt_and_where_it_resumed():
    out, clock = io.StringIO(), FakeClock()
    bar = Progress("warmup", 100, unit="steps", initial=40, stream=out, every=20, clock=clock)
    clock.now = 10.0
    bar.update(20)
    bar.close(tokens="1,024")
    assert out.getvalue().splitlines() == [
        "warmup: 60/100 steps (60%), 2.00 steps/s, 10s elapsed, ETA 20s",
        "warmup: done, 20 steps in 10s (2.00 steps/s), resumed at 40 steps; tokens 1,024",
    ]


def test_on_a_terminal_the_bar_is_cleared_and_the_summary_line_stays():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    bar = Progress("round_1/phase_b", 5, unit="steps", stream=out)
    for _ in range(5):
        bar.update(1, loss=1.0)
    bar.close(loss="1.0000 -> 1.0000")
    text = out.getvalue()
    assert "0/5 [" in text and "\r" in text  # a bar, redrawn in place
    # What a terminal shows at the end: the text after the last carriage return of each line.
    shown = [line.rpartition("\r")[2].strip() for line in text.split("\n")]
    assert [line for line in shown if line][-1].startswith("round_1/phase_b: done, 5 steps in ")


def test_only_host_0_shows_progress(monkeypatch):
    monkeypatch.setenv("ABSCOT_PROCESS_ID", "1")
    out = io.StringIO()
    bar = Progress("sampling", 4, stream=out, every=1)
    bar.update(4)
    bar.close()
    assert out.getvalue() == ""


def write_requests_file(path: Path, n: int) -> None:
    from abscot_jax.sampling.protocol import SamplingRequest, write_requests

    write_requests(path, [SamplingRequest(id=f"r{i}", prompt_ids=[5 + i, 9, 11 + i], mode="verbal", temperature=0.0,
                                          max_new_tokens=4, seed=i) for i in range(n)])


@pytest.mark.slow
def test_jax_engine_sampling_prints_a_line_per_batch_into_a_pipe(tmp_path, model_dir):
    """The engine CLI on 5 requests in batches of 2, stdout a pipe, a line every item: a line when
    each batch is done (2, 4, 5), then the summary."""
    requests, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests_file(requests, 5)
    done = subprocess.run([sys.executable, "-m", "abscot_jax.sampling.engines", "--engine", "jax", "--model",
                           str(model_dir), "--requests", str(requests), "--out", str(results), "--max-batch", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ABSCOT_PROGRESS_EVERY": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split(",")[0] for line in lines[:3]] == [
        "sampling: 2/5 requests (40%)", "sampling: 4/5 requests (80%)",
        "sampling: 5/5 requests (100%)"]
    generated = sum(len(json.loads(line)["token_ids"]) for line in results.read_text().splitlines())
    assert lines[3].startswith("sampling: done, 5 requests in ") and lines[3].endswith(
        f"; generated tokens {generated}")
    assert len(lines) == 4


def tiny_phase(out_dir: Path, *, steps_between_lines: int):
    from abscot_jax.config import load_config
    from abscot_jax.data.roles import Role
    from abscot_jax.data.sequences import make_example
    from abscot_jax.model.config import Qwen3Config
    from abscot_jax.model.qwen3 import Qwen3
    from abscot_jax.sharding import MeshConfig, make_mesh
    from abscot_jax.train.runner import run_phase

    tiny = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    rng = np.random.default_rng(0)
    examples = [make_example([(rng.integers(0, 64, 5), role) for role in (Role.PROMPT, Role.ANSWER)],
                             example_id=str(i), phase="A") for i in range(10)]
    cfg = load_config(None, ["train.mode=full", "train.seq_len=16", "train.batch_size=2", "train.epochs=1",
                             "train.checkpoint_every=1", "train.keep_checkpoints=5"])
    os.environ["ABSCOT_PROGRESS_EVERY"] = str(steps_between_lines)
    try:
        return run_phase(Qwen3(tiny, rngs=nnx.Rngs(0)), examples, cfg, out_dir, make_mesh(MeshConfig(), jax.devices()[:1]))
    finally:
        del os.environ["ABSCOT_PROGRESS_EVERY"]


@pytest.mark.slow
def test_training_phase_lines_and_summary_then_the_export_names_its_step(tmp_path, capsys):
    phase_dir = tmp_path / "round_1" / "phase_a"
    _, summary = tiny_phase(phase_dir, steps_between_lines=2)
    lines = capsys.readouterr().out.splitlines()
    steps = summary["steps"]
    records = [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps >= 3 and len(records) == steps
    progress = [line for line in lines if line.startswith("round_1/phase_a: ")]
    want = [f"round_1/phase_a: {s}/{steps} steps" for s in range(2, steps + 1, 2)]
    assert [line.split(" (")[0] for line in progress[:-1]] == want
    for line, s in zip(progress, range(2, steps + 1, 2)):
        assert line.endswith(f"; loss {records[s - 1]['loss']:.4g}; tokens/s {records[s - 1]['tokens_per_s']:,.0f}")
    tokens = sum(r["processed_tokens"] for r in records)
    assert progress[-1].startswith(f"round_1/phase_a: done, {steps} steps in ")
    assert progress[-1].endswith(f"; tokens {tokens:,}; loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}")

    # flax_to_hf says which step it exported: the one asked for, and whether it is the latest.
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "convert/flax_to_hf.py", "--ckpt", str(phase_dir / "checkpoints" / "2"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    listed = ", ".join(str(s) for s in range(1, steps + 1))
    assert done.stdout.splitlines()[-1] == (f"wrote {out} from step 2 of {phase_dir} (not its latest; steps there: "
                                            f"{listed})")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert done.stdout.splitlines()[-2].startswith(f"flax_to_hf: done, {amount(size, 'B')} in ")


def test_a_warmup_phase_is_labelled_warmup():
    from abscot_jax.train.runner import phase_label

    assert phase_label(Path("runs/demo/warmup/phase")) == "warmup"
    assert phase_label(Path("runs/demo/round_2/phase_b")) == "round_2/phase_b"


SLEEPER = """
import sys, time
from abscot_jax.errors import run_cli

def main(argv):
    print("ready", flush=True)
    time.sleep(120)

sys.exit(run_cli(main, interrupt_line=True))
"""


def ctrl_c_default():
    """In the child before exec: SIGINT handled by default, as in a terminal. A shell that starts
    pytest in the background sets SIGINT to ignored, which children inherit and Python keeps."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_a_command_gives_one_line_and_exit_130(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    proc = subprocess.Popen([sys.executable, str(script), "--some", "option"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_default)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"interrupted: {sys.executable} {script} --some option stopped before it finished")
    assert "nothing half-written" in lines[0]


def test_ctrl_c_in_an_evaluation_gives_one_line_and_writes_nothing(tmp_path, model_dir):
    """The eval command interrupted once it has printed its settings (while it loads and samples)."""
    out = tmp_path / "eval"
    proc = subprocess.Popen([sys.executable, "-m", "abscot_jax.eval", "--model", str(model_dir), "--mode", "abstract",
                             "--data", "tests/data/math500_fixture.jsonl", "--out", str(out), "--m-min", "2",
                             "--m-max", "4", "--max-new-tokens", "200"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_default)
    assert proc.stdout.readline().startswith("settings (")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if not line.startswith("MATH-500 ")]  # (the data's load line)
    assert len(lines) == 1 and lines[0].startswith("interrupted: ") and "abscot_jax.eval" in lines[0], err[-3000:]
    assert not out.exists()


def test_loading_a_local_file_prints_no_datasets_bars(tmp_path, capfd):
    """A file datasets has not seen (a new path) is converted afresh, which draws "Generating train
    split" bars unless the loaders silence them; the setting is put back afterwards."""
    import datasets

    from abscot_jax.data.dolci import load_dolci
    from abscot_jax.data.math500 import load_math500

    before = datasets.are_progress_bars_disabled()
    for name in ("dolci_fixture.jsonl", "math500_fixture.jsonl"):
        (tmp_path / name).write_bytes((REPO / "tests" / "data" / name).read_bytes())
    examples, _ = load_dolci(str(tmp_path / "dolci_fixture.jsonl"), verbose=False)
    problems, _ = load_math500(str(tmp_path / "math500_fixture.jsonl"))
    assert examples and problems
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert datasets.are_progress_bars_disabled() == before
