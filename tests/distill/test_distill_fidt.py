import pytest

from featurefusion.distill.fidt import compute_fidt, scorer_metric
from featurefusion.toyworld.scorer import load_shipped_scorer, reference_images


def test_fidt_of_a_perfect_student_is_near_its_reference():
    scorer = load_shipped_scorer()
    a = [reference_images(t, 64, seed=0) for t in ("objects-round", "style-dark")]
    b = [reference_images(t, 64, seed=1) for t in ("objects-round", "style-dark")]
    result = compute_fidt(["round", "dark"], b, a, b, scorer_metric(scorer))
    assert result.fidt == pytest.approx(result.reference_fidt)
    # off-diagonal entries (another teacher's distribution) are far larger than the diagonal
    assert result.matrix[0][1] > 3 * result.matrix[0][0] and result.matrix[1][0] > 3 * result.matrix[1][1]
    wrong = compute_fidt(["round", "dark"], list(reversed(b)), a, b, scorer_metric(scorer))
    assert wrong.fidt > 3 * wrong.reference_fidt
    assert set(result.as_dict()) >= {"matrix", "reference", "fidt", "reference_fidt"}
