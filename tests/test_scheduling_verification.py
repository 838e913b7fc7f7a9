"""Greedy verification of linear drafts and token trees."""

from __future__ import annotations

import pytest

from pipesim.scheduling import verify_linear, verify_tree


@pytest.mark.parametrize("draft,predictions,accepted,next_token,checked", [
    ([5, 6, 7], [5, 6, 7, 8], [5, 6, 7], 8, 3),  # all accepted: bonus token
    ([5, 6, 7], [5, 9, 7, 8], [5], 9, 2),  # second rejected: correction
    ([5, 6, 7], [4, 6, 7, 8], [], 4, 1),  # first rejected
    ([], [3], [], 3, 0),  # nothing drafted: plain decoding
])
def test_verify_linear(draft, predictions, accepted, next_token, checked):
    result = verify_linear(draft, predictions)
    assert (result.accepted, result.next_token, result.n_checked) == (accepted, next_token, checked)
    assert result.emitted == accepted + [next_token]


def test_verify_linear_needs_one_more_prediction():
    with pytest.raises(ValueError, match="len\\(draft\\)\\+1"):
        verify_linear([1, 2], [1, 2])


def test_verify_tree_follows_the_matching_branch():
    #        root -> a(10) -> c(12)
    #             -> b(11) -> d(13) -> e(14)
    tokens = [10, 11, 12, 13, 14]
    parents = [-1, -1, 0, 1, 3]
    predictions = [12, 13, 99, 14, 15]  # after a: 12; after b: 13; after d: 14; after e: 15
    result = verify_tree(tokens, parents, predictions, root_prediction=11)
    assert result.accepted == [11, 13, 14] and result.next_token == 15


def test_verify_tree_rejects_at_root():
    result = verify_tree([10, 11], [-1, -1], [0, 0], root_prediction=7)
    assert result.accepted == [] and result.next_token == 7 and result.n_checked == 1


def test_verify_tree_equals_linear_on_a_chain():
    draft, predictions = [1, 2, 3], [1, 2, 4, 9]
    tree = verify_tree(draft, [-1, 0, 1], predictions[1:], root_prediction=predictions[0])
    linear = verify_linear(draft, predictions)
    assert (tree.accepted, tree.next_token) == (linear.accepted, linear.next_token)


def test_verify_tree_rejects_bad_parents():
    with pytest.raises(ValueError, match="must come before"):
        verify_tree([1, 2], [1, -1], [0, 0], root_prediction=0)
