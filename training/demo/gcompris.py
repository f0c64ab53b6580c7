"""Captioned real photos from GCompris (Debian ``gcompris-qt-data``): the demo model's only labelled photos.

GCompris, the educational suite, ships its pictures inside Qt resource files (training/demo/qt_resources.py).
Among them are a few hundred photographs that its activities name: animals (``erase``, ``explore_*_animals``),
fish, tools, household objects, dams and wind turbines (``categorization``), monuments (``explore_monuments``,
``categorization``), musicians (``explore_world_music``), the planets (``solar_system``) and monuments behind the
``details`` puzzles. A photo's caption comes from its file name (``measuringTape3.webp``: "a photo of a measuring
tape."), or is written by hand where the name does not say what is shown (:data:`BY_HAND`). Paintings, drawings
and puzzle pieces are left out. None of these photos is held out: the held-out photos (training/demo/photos.py)
come from other packages.
"""

from __future__ import annotations

import hashlib
import io
import re
from functools import cache, lru_cache
from pathlib import Path

from PIL import Image

RCC_DIR = Path("/usr/share/gcompris-qt/rcc")
APT_PACKAGE = "gcompris-qt-data"
ROOT = "gcompris/src/activities/"  # every activity's files sit under this prefix in its resource file
# folders whose photographs are named by their file names ("hammer3.webp")
NAMED_FOLDERS = ("categorization/resource/images/fishes/", "categorization/resource/images/others/",
                 "categorization/resource/images/renewable/", "categorization/resource/images/tools/",
                 "categorization/resource/images/monuments/", "erase/resource/",
                 "explore_farm_animals/resource/animals/", "explore_world_animals/resource/animals/",
                 "explore_monuments/resource/")
BY_HAND = {
    "explore_world_music/resource/music/africa.webp": "a photo of three drums on the grass.",
    "explore_world_music/resource/music/america.webp": "a photo of a drum kit and electric guitars.",
    "explore_world_music/resource/music/australia.webp": "a photo of a man playing a didgeridoo.",
    "explore_world_music/resource/music/ireland.webp": "a photo of musicians playing on a stage.",
    "explore_world_music/resource/music/italy.webp": "a photo of people in costumes singing.",
    "explore_world_music/resource/music/japan.webp": "a photo of a stage with lanterns at night.",
    "explore_world_music/resource/music/mexico.webp": "a photo of children playing violins.",
    "explore_world_music/resource/music/middleeast.webp": "a photo of a lute.",
    "explore_world_music/resource/music/orchestra.webp": "a photo of an orchestra on a stage.",
    "solar_system/resource/sun.webp": "a photo of the sun.",
    **{f"solar_system/resource/{planet}.webp": f"a photo of the planet {planet}."
       for planet in ("mercury", "venus", "earth", "mars", "jupiter", "saturn", "uranus", "neptune")},
    "details/resource/image/Chenonceau_background.webp": "a photo of the Chateau de Chenonceau over a river.",
    "details/resource/image/EgeskovSlotSpejling_background.webp": "a photo of Egeskov Castle reflected in a lake.",
    "details/resource/image/EilanDonanCastle_background.webp": "a photo of Eilean Donan Castle.",
    "details/resource/image/FanoeWindmill_background.webp": "a photo of a windmill.",
    "details/resource/image/GizahPyramids_background.webp": "a photo of the pyramids of Giza.",
    "details/resource/image/Louvre_2007_02_24_c_background.webp": "a photo of the Louvre at night.",
    "details/resource/image/NDP_background.webp": "a photo of Notre-Dame de Paris.",
    "details/resource/image/Nagoya_background.webp": "a photo of Nagoya Castle.",
    "details/resource/image/Neuschwanstein_background.webp": "a photo of Neuschwanstein Castle.",
    "details/resource/image/OperaSidney_background.webp": "a photo of the Sydney Opera House.",
    "details/resource/image/TajMahal_background.webp": "a photo of the Taj Mahal.",
    "details/resource/image/TourEiffel_background.webp": "a photo of the Eiffel Tower.",
    "details/resource/image/TowerBridgeLondon_background.webp": "a photo of Tower Bridge in London.",
}


@cache  # 8 activities, ~18 MB: each read once, not again per photo
def resource_files(activity: str) -> dict[str, bytes]:
    """The files of one activity's resource file, by their path under :data:`ROOT`."""
    from training.demo.qt_resources import read_rcc

    path = RCC_DIR / f"{activity}.rcc"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: apt-get install {APT_PACKAGE}")
    return {name.removeprefix(ROOT): data for name, data in read_rcc(path).items() if name.startswith(ROOT)}


def caption_from_name(path: str) -> str:
    """'tools/measuringTape3.webp' -> 'a photo of a measuring tape.' The rule is crude on purpose ('a photo of a
    eiffel tower.', 'a photo of a blackslate.'): captions cleaned by hand (articles, plurals, 'blackboard')
    measured lower (docs/demo-model.md)."""
    stem = re.sub(r"\d+$", "", Path(path).stem)
    return "a photo of a " + re.sub(r"([a-z])([A-Z])", r"\1 \2", stem).replace("_", " ").lower() + "."


@lru_cache(maxsize=1)
def captioned_photos() -> dict[str, str]:
    """{"gcompris:<path under ROOT>": caption} for every photograph kept, each picture once (the same file appears
    in two activities: the first is kept), in a fixed order."""
    wanted: dict[str, str] = {}
    for folder in NAMED_FOLDERS:
        activity = folder.split("/")[0]
        wanted |= {path: caption_from_name(path) for path in sorted(resource_files(activity))
                   if path.startswith(folder) and path.endswith(".webp")}
    for path in BY_HAND:
        if path not in resource_files(path.split("/")[0]):
            raise FileNotFoundError(f"{path} is not in {RCC_DIR / path.split('/')[0]}.rcc: another "
                                    f"{APT_PACKAGE} version? (expected 3.1)")
    wanted |= BY_HAND
    seen, out = set(), {}
    for path, caption in wanted.items():
        digest = hashlib.sha256(resource_files(path.split("/")[0])[path]).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out[f"gcompris:{path}"] = caption
    return out


def load(path: str) -> Image.Image:
    """The RGB photo at ``path`` (under :data:`ROOT`, e.g. "erase/resource/cheetah.webp")."""
    return Image.open(io.BytesIO(resource_files(path.split("/")[0])[path])).convert("RGB")
