"""Rewards of RL rollouts, chosen by name (`rl.reward`), behind one interface:

  math_verify  1 if the last `\\boxed{}` of the answer equals the gold answer (abscot_jax.eval.grading,
               the evaluation's own check), else 0.
  toy          1 if the last `\\boxed{}` is the running sum mod 10 of the toy problem's digits
               (abscot_jax.data.toy, computed from the question itself), else 0.
  judge        an LLM judge behind an OpenAI-compatible chat-completions endpoint scores the answer
               0-10 (reward = score / 10). A call that fails (no answer within the timeout, an
               HTTP error, no score in the reply) is retried; a rollout whose calls all fail is
               counted and dropped, never scored 0.

Every reward also grades the answer against the gold one (`Outcome.correct`), the accuracy the
step reports whatever the reward is.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from abscot_jax.data.toy import partial_sums
from abscot_jax.errors import ConfigError, RunError
from abscot_jax.eval.grading import is_correct, last_boxed
from abscot_jax.rl import REWARDS

JUDGE_SYSTEM = ("You grade a response to a problem against its reference answer. Reply with one integer "
                "from 0 (wrong) to 10 (correct and complete) and nothing else.")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


@dataclasses.dataclass(frozen=True)
class Outcome:
    reward: float | None  # None: no reward could be had (the judge failed); the rollout is dropped
    correct: bool


class Reward:
    """Scores answers to prompts (objects with `question` and `gold`)."""

    name = ""
    last_error = ""  # why the last reward could not be had (the judge's last failure)

    def skip_reason(self, prompt) -> str | None:
        """Why this reward cannot score `prompt` (the data loader skips and counts it), or None."""
        return None

    def check(self) -> None:
        """Raise RunError, with the fix, when this reward cannot score anything."""

    def score(self, prompts: Sequence, answers: Sequence[str]) -> list[Outcome]:
        raise NotImplementedError


class MathVerify(Reward):
    name = "math_verify"

    def score(self, prompts, answers):
        outcomes = []
        for prompt, answer in zip(prompts, answers):
            correct = is_correct(answer, prompt.gold)
            outcomes.append(Outcome(float(correct), correct))
        return outcomes


def toy_correct(question: str, answer: str) -> bool:
    """The toy task's check: the last boxed value is the running sum mod 10 of the question's digits."""
    boxed = last_boxed(answer)
    return boxed is not None and boxed.strip() == str(partial_sums(question)[-1])


class ToyCheck(Reward):
    name = "toy"

    def skip_reason(self, prompt):
        try:
            partial_sums(prompt.question)
        except ValueError:
            return "not_a_toy_problem"
        return None

    def score(self, prompts, answers):
        return [Outcome(float(c), c) for c in (toy_correct(p.question, a) for p, a in zip(prompts, answers))]


class JudgeFailed(Exception):
    """One judge call that gave no score."""


class Judge(Reward):
    """An LLM judge at `url` (the full `.../v1/chat/completions` address). `retries`: further
    attempts after a failed call, each after a short pause; `concurrency`: calls in flight."""

    name = "judge"

    def __init__(self, url: str, model: str, *, timeout: float = 60.0, retries: int = 2, concurrency: int = 8,
                 pause: float = 0.5):
        self.url, self.model, self.timeout, self.retries = url, model, timeout, retries
        self.concurrency, self.pause = concurrency, pause
        self.failures = 0  # rollouts dropped because every call for them failed

    def messages(self, question: str, gold: str, answer: str) -> list[dict]:
        return [{"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": f"Problem:\n{question}\n\nReference answer:\n{gold}\n\n"
                                            f"Response:\n{answer}\n\nScore (0-10):"}]

    def call(self, messages: list[dict]) -> float:
        """The judge's score, 0-10, of one conversation; JudgeFailed when there is none."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0.0}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
            content = reply["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            raise JudgeFailed(f"HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, unreachable, timed out, cut off
            raise JudgeFailed(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise JudgeFailed(f"not a chat-completions reply ({type(e).__name__}: {e})") from None
        found = _NUMBER.search(content if isinstance(content, str) else "")
        if found is None or not 0 <= float(found.group()) <= 10:
            raise JudgeFailed(f"no score from 0 to 10 in the reply {str(content)[:80]!r}")
        return float(found.group())

    def _score(self, messages: list[dict]) -> tuple[float | None, str]:
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.pause * attempt)
            try:
                return self.call(messages), ""
            except JudgeFailed as e:
                error = str(e)
        return None, error

    def check(self):
        score, error = self._score([{"role": "user", "content": "Reply with the number 10."}])
        if score is None:
            raise RunError(f"the judge at rl.judge_url={self.url} gave no score to a test request after "
                           f"{self.retries + 1} attempt(s) ({error}); start the judge server or fix rl.judge_url / "
                           "rl.judge_model")

    def score(self, prompts, answers):
        conversations = [self.messages(p.question, p.gold, a) for p, a in zip(prompts, answers)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            scored = list(pool.map(self._score, conversations))
        outcomes = []
        for prompt, answer, (score, error) in zip(prompts, answers, scored):
            if score is None:
                self.failures += 1
                self.last_error = error
            outcomes.append(Outcome(None if score is None else score / 10, is_correct(answer, prompt.gold)))
        return outcomes


def make_reward(rl) -> Reward:
    """The reward `rl.reward` names, from the run's `rl` config section."""
    if rl.reward == "math_verify":
        return MathVerify()
    if rl.reward == "toy":
        return ToyCheck()
    if rl.reward == "judge":
        return Judge(rl.judge_url, rl.judge_model, timeout=rl.judge_timeout, retries=rl.judge_retries,
                     concurrency=rl.judge_concurrency)
    raise ConfigError(f"rl.reward={rl.reward!r} is not a reward; use one of {', '.join(REWARDS)}")
