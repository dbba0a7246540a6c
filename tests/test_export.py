"""``knet export``: the torch.export program matches eager on the same images."""

from __future__ import annotations

import pytest
import torch

from knet.cli import main
from knet.evaluation.export import export_checkpoint, max_difference
from knet.method.checkpoint import load_model
from tests.test_train import make_data, run_config, untrained_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    data = make_data(tmp / "data")
    return untrained_checkpoint(run_config(data, tmp), tmp / "model.pt")


def test_the_exported_program_matches_eager_on_other_sizes(checkpoint, tmp_path):
    result = export_checkpoint(checkpoint, tmp_path / "knet.pt2")
    assert result.max_abs_difference < 1e-4
    program = torch.export.load(tmp_path / "knet.pt2").module()  # a fresh load from disk
    model, _, _ = load_model(checkpoint)
    model.eval()
    for shape in [(1, 3, 64, 64), (3, 3, 96, 160)]:  # batch and sides unlike the example's
        images = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            eager, exported = model(images), program(images)
        assert len(exported.stages) == len(eager.stages)
        assert max_difference(eager, exported) < 1e-4, shape
        assert exported.stages[0].cls_logits is None


def test_export_from_the_command_line_and_its_output_rules(checkpoint, tmp_path, capsys):
    out = tmp_path / "models" / "knet.pt2"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert out.is_file() and "max |exported - eager|" in capsys.readouterr().out
    # an earlier export is replaced; anything else is refused and kept
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    precious = tmp_path / "notes.pt2"
    precious.write_text("mine")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(precious)]) == 2
    assert precious.read_text() == "mine"
    assert "not a torch.export archive" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
