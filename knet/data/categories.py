"""Dataset categories -> contiguous training ids, things first (the split is the dataset's)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any


@dataclass(frozen=True)
class Categories:
    """The class list of a dataset, ordered as training ids: things, then stuff.

    ``ids[t]`` is the dataset's category id of training id ``t``. The thing/stuff split comes
    from each category's ``isthing`` flag; nothing in the code knows COCO's 80/53.
    """

    ids: tuple[int, ...]
    names: tuple[str, ...]
    is_thing: tuple[bool, ...]
    colors: tuple[tuple[int, int, int] | None, ...]

    @classmethod
    def from_coco(
        cls, categories: Iterable[Mapping[str, Any]], default_isthing: bool | None = None
    ) -> Categories:
        """Build from COCO category dicts (``id``, ``name``, ``isthing``, optional ``color``).

        ``default_isthing`` applies where a category has no ``isthing`` key (COCO instance
        files: every category is a thing); None makes a missing flag an error.
        """
        entries = []
        for index, cat in enumerate(categories):
            if "isthing" in cat:
                thing = bool(cat["isthing"])
            elif default_isthing is not None:
                thing = default_isthing
            else:
                raise ValueError(f"categories[{index}] (id {cat.get('id')}) has no isthing flag")
            color = cat.get("color")
            entries.append(
                (
                    not thing,
                    int(cat["id"]),
                    str(cat.get("name", cat["id"])),
                    thing,
                    tuple(int(c) for c in color) if color else None,
                )
            )
        entries.sort(key=lambda e: (e[0], e[1]))  # things first, each group by category id
        ids = tuple(e[1] for e in entries)
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate category ids")
        return cls(
            ids=ids,
            names=tuple(e[2] for e in entries),
            is_thing=tuple(e[3] for e in entries),
            colors=tuple(e[4] for e in entries),
        )

    @property
    def num_things(self) -> int:
        return sum(self.is_thing)

    @property
    def num_stuff(self) -> int:
        return len(self.ids) - self.num_things

    def __len__(self) -> int:
        return len(self.ids)

    def train_id(self, category_id: int) -> int:
        """Training id of a dataset category id; KeyError names the unknown id."""
        try:
            return self._lookup[category_id]
        except KeyError:
            raise KeyError(f"unknown category id {category_id}") from None

    @cached_property
    def _lookup(self) -> dict[int, int]:
        return {cid: t for t, cid in enumerate(self.ids)}

    def to_json(self) -> list[dict[str, Any]]:
        """COCO-style list in training-id order (``train_id`` added for readers)."""
        return [
            {
                "id": cid,
                "name": name,
                "isthing": int(thing),
                "train_id": t,
                **({"color": list(color)} if color else {}),
            }
            for t, (cid, name, thing, color) in enumerate(
                zip(self.ids, self.names, self.is_thing, self.colors, strict=True)
            )
        ]

    @classmethod
    def from_json(cls, items: Iterable[Mapping[str, Any]]) -> Categories:
        return cls.from_coco(items)
