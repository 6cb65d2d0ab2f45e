"""`shapes` with its pixel concept labels as training data (for the concept segmenter, conf/model/segmenter.yaml):
the same folder and splits as ShapesDataModule, but every loader yields the Broden probe items of a split
(``raw`` images in [0, 1], ``seg`` label maps, ``image_labels``, ``label``), decoded once and kept in memory."""
from __future__ import annotations

from datamodules.shapes import ShapesDataModule, ShapesProbe


class ShapesSegmentationDataModule(ShapesDataModule):
    """ShapesDataModule whose train/val/test loaders yield concept-labelled items (datamodules/broden.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._labelled: dict[str, ShapesProbe] = {}

    def labelled(self, split: str) -> ShapesProbe:
        if split not in self._labelled:
            self.prepare_data()
            self._labelled[split] = ShapesProbe(self.folder, split, mean=self.mean, std=self.std, cache=True,
                                                hint=self.hint)
        return self._labelled[split]

    @property
    def concept_names(self) -> list[str]:
        return list(self.labelled("val").concept_names)

    def train_dataloader(self):
        ds = self.labelled("train")
        return self._loader(ds, shuffle=True, drop_last=len(ds) > self.batch_size)

    def val_dataloader(self):
        return self._loader(self.labelled("val"), shuffle=False)

    def test_dataloader(self):
        return self._loader(self.labelled("test"), shuffle=False)
