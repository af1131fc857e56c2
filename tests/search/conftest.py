"""What the search tests share: the one tiny finished study (``tiny_study``) and the tiny data sets they make
themselves (a text corpus, CIFAR-format pickles)."""

import pickle
import random

import numpy as np
import pytest

TINY_TASK = dict(pool=2048, eval_size=256, batch=32, teacher_width=16, teacher_depth=2, widths=[16, 32, 64])
TINY_STUDY = dict(  # the regression task, the full space, three levels: about 10 s on one core
    budget=6e8,
    levels=3,
    ratio=2.0,
    top_trials=7,
    min_steps=8,
    target_steps=30,
    task_settings=TINY_TASK,
    device="cpu",
    confirm_share=0.0,  # the exploration loop alone (tests/search/test_confirm.py runs both phases)
)


SMALLEST_STUDY = dict(  # btt only, two widths, 4e7 FLOPs: a study that exists, for exit codes and secrets tests
    budget=4e7,
    levels=3,
    ratio=2.0,
    top_trials=3,
    min_steps=4,
    target_steps=10,
    task_settings=dict(TINY_TASK, widths=[16, 32]),
    device="cpu",
    space="btt",
)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """(result, folder) of one tiny finished study, run once per session for every module that reads a study
    (the loop's, the report's). A test may resume it or write its report into the folder (what a rerun does);
    a test that changes or deletes its files works on a copy."""
    from search.loop import run_search

    out = tmp_path_factory.mktemp("tiny_study")
    return run_search("tiny", out=str(out), **TINY_STUDY), str(out)


def make_text(n_lines: int = 3000, seed: int = 0) -> str:
    """Text from a small grammar: structured enough that a model beats the unigram entropy quickly."""
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "my friend", "the old man", "a bird"]
    verb = ["sat on", "ran to", "looked at", "jumped over", "walked past"]
    obj = ["the mat", "a tree", "the house", "the river", "a red car"]
    return "\n".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(make_text())
    return str(path)


def write_cifar(folder, n_train=96, n_test=48, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("data_batch_1", n_train), ("test_batch", n_test)):
        labels = rng.integers(0, 10, n)
        # class-dependent means so there is something to learn
        data = np.clip(rng.normal(100 + 10 * labels[:, None], 30, (n, 3072)), 0, 255).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, f)
    return str(folder)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py")
