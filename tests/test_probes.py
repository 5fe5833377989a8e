"""Linear probes: labels derived from text, selectivity on synthetic hidden states, reproducibility, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autocompress.errors import UserError
from autocompress.profile.lexicon import is_function_word
from autocompress.profile.probes import (EXCLUDED, TASKS, WORD_CLASSES, RoleProfile, control_labels, dominant_roles,
                                         fold_ids, nesting_depths, probe_accuracies, probe_roles, smooth, task_labels,
                                         token_texts, word_class)


def labelled(tokenizer, text: str, top_k: int = 8):
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids, token_texts(tokenizer, ids), task_labels(ids, tokenizer, top_k=top_k)


def test_nesting_depth_of_characters():
    assert nesting_depths("f(a, [b])") == [0, 0, 1, 1, 1, 1, 2, 1, 0]
    assert nesting_depths('x "y" z') == [0, 0, 0, 1, 0, 0, 0]
    assert nesting_depths("``a``") == [0, 0, 1, 0, 0]
    assert nesting_depths("don't 'r'") == [0, 0, 0, 0, 0, 0, 0, 1, 0]
    assert nesting_depths("(a\n\nb)") == [0, 1, 0, 0, 0, 0]  # a blank line closes everything
    assert nesting_depths("a) b") == [0, 0, 0, 0]  # an unmatched closer is ignored


def test_token_labels_on_hand_written_text(tokenizer):
    ids, texts, labels = labelled(tokenizer, "f(a, [b]) the cat, 42.")
    assert "".join(texts) == "f(a, [b]) the cat, 42."
    depth = dict(zip(texts, labels["nesting"].tolist()))
    assert [depth[t] for t in ("f", "(", "a", "[", "b", "]", ")")] == [0, 0, 1, 1, 2, 1, 0]
    by_text = {t: WORD_CLASSES[c] if c != EXCLUDED else None for t, c in zip(texts, labels["word_class"].tolist())}
    assert by_text[","] == "punctuation" and by_text["."] == "punctuation"
    assert by_text[" the"] == "function"
    assert by_text["4"] == by_text["2"] == "number"
    # " cat" is split by the tiny tokenizer; every piece carries the class of the whole word
    cat = texts.index(" c")
    assert texts[cat + 1] == "at"
    assert [WORD_CLASSES[c] for c in labels["word_class"][cat:cat + 2]] == ["content", "content"]
    assert labels["morphology"][cat:cat + 2].tolist() == [1, 0]
    assert labels["word_class"][texts.index(" ")] == EXCLUDED  # whitespace-only tokens are left out


def test_morphology_marks_word_starts(tokenizer):
    ids, texts, labels = labelled(tokenizer, "Get the cat")  # 'G' 'et' ' the' ' c' 'at'
    assert texts == ["G", "et", " the", " c", "at"]
    assert labels["morphology"].tolist() == [1, 0, 1, 1, 0]
    ids, texts, labels = labelled(tokenizer, "(x)")
    assert labels["morphology"].tolist() == [EXCLUDED, 1, EXCLUDED]  # after punctuation a word starts


def test_word_class_lexicon():
    assert word_class("The") == "function" and word_class("because") == "function"
    assert word_class("42") == "number" and word_class("cat") == "content"
    assert is_function_word("should") and not is_function_word("loop")


def test_lexical_and_prediction_labels(tokenizer):
    ids, texts, labels = labelled(tokenizer, "(x, y, z, w)", top_k=1)
    assert texts.count(",") == 3  # the one most frequent token
    # the most frequent id gets 0, every other token the 'other' class (= top_k)
    assert labels["lexical"].tolist() == [0 if t == "," else 1 for t in texts]
    assert labels["prediction"][:-1].tolist() == labels["lexical"][1:].tolist()
    assert labels["prediction"][-1] == EXCLUDED


def test_control_task_is_a_function_of_token_type():
    rng = np.random.default_rng(0)
    ids = np.array([5, 6, 5, 7, 6, 5, 8, 8])
    labels = np.array([0, 1, 0, 2, EXCLUDED, 1, 2, 2])
    control = control_labels(labels, ids, rng)
    assert control[4] == EXCLUDED
    assert control[0] == control[2] == control[5] and control[6] == control[7]
    assert set(control[control != EXCLUDED].tolist()) <= {0, 1, 2}


def test_a_task_without_examples_gives_nan_not_an_error(tokenizer):
    states, tokens = synthetic_states(tokenizer)
    labels = np.full(tokens.numel(), EXCLUDED)
    assert (control_labels(labels, tokens.numpy(), np.random.default_rng(0)) == EXCLUDED).all()
    x = states[1].numpy()
    assert all(math.isnan(a) for a in probe_accuracies(x, [labels, labels], fold_ids(tokens.numel(), 0)))


def test_control_task_keeps_the_label_distribution():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 500, size=20000)
    labels = (rng.random(20000) < 0.3).astype(np.int64)  # 30% ones, unrelated to the type
    control = control_labels(labels, ids, np.random.default_rng(1))
    assert abs(control.mean() - 0.3) < 0.01
    assert all(len(set(control[ids == t].tolist())) == 1 for t in range(0, 500, 50))


def test_folds_are_whole_blocks_and_balanced():
    folds = fold_ids(1000, seed=3, folds=4, block=100)
    assert np.bincount(folds).tolist() == [300, 300, 200, 200]
    assert all(len(set(folds[i:i + 100].tolist())) == 1 for i in range(0, 1000, 100))
    assert (fold_ids(1000, seed=3, block=100) == folds).all()
    assert (fold_ids(1000, seed=4, block=100) != folds).any()


def test_closed_form_probe_matches_scikit_learn():
    from sklearn.linear_model import Ridge
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # tiny products: threaded BLAS only adds contention
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12)).astype(np.float32)
    labels = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.7, size=600) > 0).astype(np.int64) + \
        (x[:, 2] > 1).astype(np.int64)
    labels[::7] = EXCLUDED
    folds = fold_ids(600, seed=0, folds=3, block=50)
    ours = probe_accuracies(x, [labels], folds, alpha=0.05)[0]

    keep = labels != EXCLUDED
    z, y, f = x[keep], labels[keep], folds[keep]
    correct = 0
    for k in range(3):
        train, test = f != k, f == k
        classes = np.unique(y[train])
        ridge = Ridge(alpha=0.05 * train.sum(), solver="cholesky").fit(z[train], 2.0 * (y[train][:, None] == classes) - 1)
        correct += (classes[ridge.predict(z[test]).argmax(1)] == y[test]).sum()
    assert ours == pytest.approx(correct / keep.sum(), abs=1e-9)
    assert 0.6 < ours < 1.0


WORDS = ("the", "a", "of", "and", "to", "is", "it", "with", "loop", "event", "object", "returns", "parser",
         "value", "handle", "context", "3", "42", "1024")


def synthetic_text(seed: int, sentences: int = 120) -> str:
    """Seeded docstring-like sentences with brackets, quotes and numbers, so every task has every label."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(sentences):
        words = list(rng.choice(WORDS, size=rng.integers(4, 10)))
        if rng.random() < 0.6:
            at = int(rng.integers(0, len(words)))
            inner = " ".join(rng.choice(WORDS, size=rng.integers(1, 4)))
            if rng.random() < 0.5:
                inner += f" [{rng.choice(WORDS)} {rng.choice(WORDS)}]"
            words.insert(at, f'({inner})' if rng.random() < 0.7 else f'"{inner}"')
        parts.append(" ".join(words).capitalize() + rng.choice([".", ",", ";"]))
    return " ".join(parts)


def synthetic_states(tokenizer, encoded: tuple[str, ...] = TASKS, seed: int = 0, hidden: int = 96, top_k: int = 8):
    """Three layers: noise, one that linearly encodes the labels of the ``encoded`` tasks, noise again."""
    tokens = torch.tensor(tokenizer(synthetic_text(seed), add_special_tokens=False)["input_ids"])
    labels = task_labels(tokens, tokenizer, top_k=top_k)
    generator = torch.Generator().manual_seed(seed)
    n_tokens = tokens.numel()
    noise = [torch.randn(n_tokens, hidden, generator=generator) for _ in range(3)]
    informative = noise[1].clone() * 0.3
    column = 0
    for task in encoded:
        for value in range(int(labels[task].max()) + 1):
            informative[:, column] += 3.0 * torch.from_numpy(labels[task] == value).float()
            column += 1
    assert column <= hidden
    return [noise[0], informative, noise[2]], tokens


def test_synthetic_text_has_every_label(tokenizer):
    states, tokens = synthetic_states(tokenizer)
    labels = task_labels(tokens, tokenizer)
    assert 1000 < tokens.numel() < 3000
    assert set(labels["nesting"].tolist()) == {0, 1, 2}
    assert set(labels["word_class"].tolist()) == {EXCLUDED, 0, 1, 2, 3}
    assert set(labels["morphology"].tolist()) == {EXCLUDED, 0, 1}


@pytest.mark.parametrize("task", TASKS)
def test_selectivity_finds_the_layer_that_encodes_a_task(tokenizer, task):
    states, tokens = synthetic_states(tokenizer, encoded=(task,), top_k=8)
    # top_k=8 of ~100 types: with 'other' holding most types, identity is more than a type labeling
    roles = probe_roles(states, tokens, tokenizer, seed=0, top_k=8)
    assert roles.tasks == list(TASKS) and roles.layers == 3
    sel = roles.selectivity[task]
    assert roles.accuracy[task][1] > 0.97
    assert sel[1] > max(0.1, 0.5 * (1 - roles.chance[task])), sel  # most of the room above chance
    assert abs(sel[0]) < 0.1 and abs(sel[2]) < 0.1, sel  # noise layers: probe no better than control
    assert roles.dominant[1] == task


def test_all_tasks_encoded_together(tokenizer):
    states, tokens = synthetic_states(tokenizer)
    roles = probe_roles(states, tokens, tokenizer, seed=0, top_k=8)
    for task in TASKS:
        assert roles.selectivity[task][1] > roles.selectivity[task][0] + 0.05, task
    assert roles.dominant[1] != "none"


def test_same_seed_same_profile_and_json_round_trip(tokenizer):
    states, tokens = synthetic_states(tokenizer)
    first = probe_roles(states, tokens, tokenizer, seed=1)
    second = probe_roles(states, tokens, tokenizer, seed=1)
    assert first.selectivity == second.selectivity and first.dominant == second.dominant
    other = probe_roles(states, tokens, tokenizer, seed=2)
    assert other.control_accuracy != first.control_accuracy
    back = RoleProfile.from_json(first.to_json())
    assert back.selectivity == first.selectivity and back.dominant == first.dominant
    assert back.block_roles(0) == {t: first.selectivity[t][1] for t in TASKS}


def test_max_tokens_truncates(tokenizer):
    states, tokens = synthetic_states(tokenizer)
    roles = probe_roles(states, tokens, tokenizer, max_tokens=700)
    assert roles.tokens == 700


def test_dominant_role_is_relative_to_each_tasks_curve():
    selectivity = {"lexical": [0.8, 0.7, 0.4], "nesting": [0.0, 0.05, 0.1], "noise": [0.01, -0.01, 0.0]}
    assert dominant_roles(selectivity) == ["lexical", "lexical", "nesting"]  # raw size does not decide
    assert dominant_roles({"a": [-0.1, math.nan]}) == ["none", "none"]
    # a high but flat curve does not win every layer: its wiggles stay under the spread floor
    curves = {"flat": [0.2, 0.21, 0.2, 0.21, 0.2, 0.21], "rising": [0.0, 0.02, 0.05, 0.08, 0.1, 0.12],
              "early": [0.1, 0.08, 0.05, 0.0, -0.01, 0.0]}
    assert dominant_roles(curves) == ["early", "early", "early", "rising", "rising", "rising"]


def test_smoothing_over_depth():
    assert np.allclose(smooth(np.array([0.0, 1.0, 0.0])), [1 / 3, 0.5, 1 / 3])
    assert np.allclose(smooth(np.array([2.0, 2.0, 2.0, 2.0])), 2.0)


def test_bad_input_is_one_clear_error(tokenizer):
    tokens = torch.arange(600)
    with pytest.raises(UserError, match="layer 1 has shape"):
        probe_roles([torch.zeros(600, 8), torch.zeros(599, 8)], tokens, tokenizer)
    with pytest.raises(UserError, match="at least one layer"):
        probe_roles([], tokens, tokenizer)
    with pytest.raises(UserError, match="at least 512 tokens"):
        probe_roles([torch.zeros(500, 8)], tokens[:500], tokenizer)
    with pytest.raises(UserError, match="not a valid role profile"):
        RoleProfile.from_json({"tasks": ["lexical"]})


@pytest.mark.real
def test_real_model_roles_on_a_short_stream(smollm2):
    """SmolLM2-135M on 1,024 calibration tokens: identity and word class are read above their controls."""
    from autocompress.data import load_tokens

    tokens = load_tokens("stdlib-docs", smollm2.tokenizer, "calibration", 1024).tokens
    with torch.inference_mode():
        states = [torch.cat(chunk) for chunk in zip(*(
            [h[0] for h in smollm2.model(window[None], output_hidden_states=True).hidden_states]
            for window in tokens.split(512)))]
    picked = [states[0], states[6], states[30]]  # embeddings, block 5, last block
    roles = probe_roles(picked, tokens, smollm2.tokenizer, seed=0)
    assert roles.selectivity["lexical"][1] > 0.1 and roles.selectivity["word_class"][1] > 0.1
    assert roles.accuracy["lexical"][0] > roles.accuracy["lexical"][2]  # identity fades with depth
    assert roles.selectivity["prediction"][2] > roles.selectivity["prediction"][0]  # the future is read late
