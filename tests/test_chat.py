"""`ferry chat` through a pseudo-terminal: keys in, screen out, on a tiny checkpoint given a chat
template (the tiny tokenizer has none)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.cli import main
from helpers import default_sigint

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
PROMPT = "\r\n> "  # the prompt at the start of a line (an answer's text may hold "> ")
STATS = re.compile(r"(\d+) new tokens \((\w+)\) \| prompt (\d+) tokens, (\d+) reused")


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with a chat template, and room for answers long enough to interrupt
    (512 positions: the context chat reserves)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(tiny_model_dir(), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 512
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def spawn(model: Path, cache: Path, *flags: str):
    """`python -m ferry chat` on a terminal, waiting for its first prompt."""
    env = dict(os.environ, FERRY_CACHE_DIR=str(cache), TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "ferry", "chat", "-m", str(model), "--dtype", "fp32", *flags],
                          cwd=str(ROOT), env=env, encoding="utf-8", codec_errors="replace", timeout=60,
                          dimensions=(40, 250), preexec_fn=default_sigint)
    child.expect_exact("> ")
    return child


def say(child, line: str) -> str:
    """Send a line; the screen up to the next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before


def stats(child) -> tuple[int, str, int, int]:
    found = STATS.search(say(child, "/stats"))
    assert found, child.before
    new, reason, prompt, reused = found.groups()
    return int(new), reason, int(prompt), int(reused)


def leaves(child) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_turns_reuse_the_conversation(chat_model, tmp_path):
    child = spawn(chat_model, tmp_path, "-n", "6", "--system", "Be brief.")
    assert "[no stats" in say(child, "/stats")
    say(child, "The capital of France")
    new, _, first_prompt, reused = stats(child)
    assert 0 < new <= 6 and reused == 0
    say(child, "Count to ten")
    _, _, prompt, reused = stats(child)
    assert prompt > first_prompt
    assert reused > 0  # the second turn's prompt begins with the first turn's sequence
    assert "[a new conversation]" in say(child, "/reset")
    assert "[no stats" in say(child, "/stats")
    say(child, "The capital of France")
    assert stats(child)[2:] == (first_prompt, 0)  # the same first turn again, nothing reused
    assert "unknown command /bogus" in say(child, "/bogus")
    assert "/reset" in say(child, "/help")
    child.sendline("/exit")
    assert leaves(child) == 0
    assert "Count to ten" in (tmp_path / "chat_history").read_text()


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(chat_model, tmp_path):
    child = spawn(chat_model, tmp_path, "-n", "5000", "--ignore-eos")
    child.sendline("Count to ten")
    child.expect_exact("Count to ten\r\n")
    child.expect(r"\S")  # the answer has begun: it would run to the end of the context
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    assert "[no stats" in say(child, "/stats")
    # The next answer runs to the end of the context, reusing the stopped one's tokens.
    assert "[the context is full" in say(child, "A quick brown fox")
    new, reason, prompt, reused = stats(child)
    assert reason == "context" and prompt + new >= 500 and reused > 0
    # Over the context: one line, and the conversation is still there.
    assert "more than the context" in say(child, "def add(a, b)")
    assert stats(child)[2] == prompt
    say(child, "/reset")
    child.sendeof()
    assert leaves(child) == 0


def test_ctrl_c_at_the_prompt_clears_the_line_and_twice_leaves(chat_model, tmp_path):
    child = spawn(chat_model, tmp_path)
    child.send("half a line")
    child.expect_exact("half a line")  # echoed: readline has the line, so Ctrl-C reaches input()
    child.sendintr()
    child.expect_exact("[Ctrl-C again or Ctrl-D leaves]")
    child.expect_exact("> ")
    assert "[no stats" in say(child, "/stats")  # not "half a line/stats"
    child.sendintr()
    child.expect_exact("> ")
    child.sendintr()
    assert leaves(child) == 0


def test_lines_not_utf8_are_ignored_and_the_chat_goes_on(chat_model, tmp_path):
    """Piped stdin under a strict locale (PYTHONIOENCODING as a UTF-8 locale sets it): a stray
    byte, then a UTF-8-encoded lone surrogate; each is one line, and the next message is answered."""
    lines = b"bad \xff byte\n\xed\xa0\x80 surrogate\nThe capital of France\n/stats\n"
    env = dict(os.environ, FERRY_CACHE_DIR=str(tmp_path), PYTHONIOENCODING="utf-8:strict")
    done = subprocess.run([sys.executable, "-m", "ferry", "chat", "-m", str(chat_model), "--dtype", "fp32", "-n", "3"],
                          input=lines, capture_output=True, cwd=ROOT, env=env, timeout=300)
    out, err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    assert done.returncode == 0 and "Traceback" not in err, err
    assert out.count("[ignored a line that is not valid UTF-8]") == 2, out
    found = STATS.search(out)
    assert found and int(found.group(1)) > 0, out  # the good message after them was answered


def test_a_model_without_a_chat_template_exits_2(tiny_model_dir, capsys):
    assert main(["chat", "-m", str(tiny_model_dir()), "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no chat template" in err


def test_ctrl_c_while_streaming_asks_once_then_interrupts():
    import signal

    from ferry.cli.chat import stop_requests

    before = signal.getsignal(signal.SIGINT)
    with stop_requests() as asked:
        assert not asked.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        assert asked.is_set()  # the first asks the answer to stop at its next token
        with pytest.raises(KeyboardInterrupt):  # the second stops it now (a long prefill)
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
