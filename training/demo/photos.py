"""Real photos for the demo model, all offline: unlabelled ones to distil on, and a held-out set labelled by hand.

Sources (nothing downloaded at run time):
- scikit-image's bundled photos (``skimage.data``), scikit-learn's two sample images, matplotlib's Grace Hopper;
- Debian ``mate-backgrounds``: the nature photos (``/usr/share/backgrounds/mate/nature``);
- Debian ``tuxpaint-data``: Tux Paint's photo templates (``/usr/share/tuxpaint/templates``);
- Debian ``lomiri-wallpapers-16.04``, ``lomiri-wallpapers-20.04`` (``/usr/share/backgrounds``) and
  ``plasma-workspace-wallpapers`` (``/usr/share/wallpapers/<name>/contents/images``): their photographs (the
  abstract and rendered wallpapers are left out), training only;
- Debian ``opencv-doc``: the photographs among OpenCV's sample images (``/usr/share/doc/opencv-doc/examples``),
  held out only: a second held-out set, added after the first round of settings had been chosen on the first
  (:data:`FIRST_HELDOUT`); the second round (docs/demo-model.md) saw both;
- Debian ``gcompris-qt-data``: 277 photographs with captions from their file names (training/demo/gcompris.py:
  ``captioned_photos``), and the 100 faces of scikit-image's LFW subset, captioned "a photo of a person.":
  training only (:func:`captioned`).

:data:`HELDOUT` holds the photos with a subject a person names at a glance, labelled by hand from the file name
and a look at the picture (``LadyBird.jpg``: a ladybug; ``trees_at_dusk.jpg``: a tree). They are never trained
on, not even as crops. :data:`TRAINING` holds the rest (bark, rock, gravel, machinery, the Hubble deep field...):
training sees only random crops of those, without labels (the ImageNet head labels them: training/demo/distill.py).
The captioned photos (:func:`captioned`) are trained on whole and as :data:`CAPTIONED_CROPS` crops each, with their
captions.
"""

from __future__ import annotations

import hashlib
import random
from functools import cache
from pathlib import Path

from PIL import Image

MATE_DIR = Path("/usr/share/backgrounds/mate/nature")
TEMPLATES_DIR = Path("/usr/share/tuxpaint/templates")
LOMIRI_DIR = Path("/usr/share/backgrounds")
PLASMA_DIR = Path("/usr/share/wallpapers")
OPENCV_DIR = Path("/usr/share/doc/opencv-doc/examples")
APT_PACKAGES = ("mate-backgrounds", "tuxpaint-data", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04",
                "plasma-workspace-wallpapers", "opencv-doc", "gcompris-qt-data")

# photo -> class, by hand. Sources: "skimage:<name>", "sklearn:<file>", "matplotlib:<file>", "mate:<file>",
# "tuxpaint:<file>", "lomiri:<file>", "plasma:<wallpaper>/<file>", "opencv:<path under OPENCV_DIR>",
# "gcompris:<path in an activity's resource file>" (training/demo/gcompris.py).
FIRST_HELDOUT = {
    "skimage:chelsea": "cat",
    "skimage:coffee": "cup of coffee",
    "skimage:astronaut": "person",
    "skimage:camera": "person",
    "matplotlib:grace_hopper.jpg": "person",
    "skimage:rocket": "rocket",
    "skimage:coins": "coin",
    "sklearn:flower.jpg": "flower",
    "mate:FreshFlower.jpg": "flower",
    "mate:Garden.jpg": "flower",
    "mate:YellowFlower.jpg": "flower",
    "mate:LadyBird.jpg": "ladybug",
    "mate:GreenMeadow.jpg": "grass",
    "skimage:grass": "grass",
    "mate:Blinds.jpg": "leaf",
    "mate:RainDrops.jpg": "leaf",
    "tuxpaint:sun_behind_leaves.jpg": "leaf",
    "mate:Storm.jpg": "cloudy sky",
    "tuxpaint:sun_behind_clouds.jpg": "cloudy sky",
    "sklearn:china.jpg": "building",
    "tuxpaint:lighthouse.jpg": "building",
    "tuxpaint:sheep.jpg": "sheep",
    "tuxpaint:jellyfish.jpg": "jellyfish",
    "tuxpaint:ocean_waves.jpg": "sea",
    "tuxpaint:ocean_splash.jpg": "sea",
    "tuxpaint:redwoods_above.jpg": "tree",
    "tuxpaint:trees_above.jpg": "tree",
    "tuxpaint:trees_at_dusk.jpg": "tree",
    "skimage:moon": "moon",
}
# the second held-out set, labelled after the settings were chosen on the first (docs/demo-model.md)
OPENCV_HELDOUT = {
    "opencv:data/apple.jpg": "apple",
    "opencv:data/baboon.jpg": "monkey",
    "opencv:data/basketball1.png": "person",
    "opencv:data/messi5.jpg": "person",
    "opencv:data/building.jpg": "building",
    "opencv:data/home.jpg": "building",
    "opencv:data/butterfly.jpg": "butterfly",
    "opencv:data/chicky_512.png": "dog",
    "opencv:data/orange.jpg": "orange",
    "opencv:data/squirrel_cls.jpg": "squirrel",
    "opencv:alphamat/input_images/plant.jpg": "potted plant",
    "opencv:data/aloeL.jpg": "potted plant",
    "opencv:hfs/data/000.jpg": "bird",
    "opencv:data/licenseplate_motion.jpg": "car",
    "opencv:data/board.jpg": "circuit board",
    "opencv:data/aero1.jpg": "city",
    "opencv:data/aero3.jpg": "city",
}
HELDOUT_SETS = {"first": FIRST_HELDOUT, "opencv": OPENCV_HELDOUT}
HELDOUT = FIRST_HELDOUT | OPENCV_HELDOUT
TRAINING = (
    "tuxpaint:burnt_bark.jpg", "tuxpaint:mossy_bark.jpg", "tuxpaint:mossy_log.jpg", "tuxpaint:mudstone.jpg",
    "tuxpaint:rocks.jpg", "tuxpaint:cliff.jpg", "tuxpaint:corn_maze.jpg", "tuxpaint:wool_mill_machine.jpg",
    "tuxpaint:spiders_web.jpg", "mate:Aqua.jpg", "mate:Dune.jpg", "mate:TwoWings.jpg", "mate:Wood.jpg",
    "skimage:gravel", "skimage:brick", "skimage:hubble_deep_field", "skimage:retina", "skimage:clock",
    # a bridge, a dragonfly, a fig in a bowl, paintbrushes, a room, mountains, a bird figure, two dogs, a clock,
    # a stream, a path, dandelions, a sunset; a nuthatch
    "lomiri:Bridge_by_Sander_Klootwijk.jpg", "lomiri:Dragonfly_by_Bolly.jpg", "lomiri:Picture_0B_by_freespace.jpg",
    "lomiri:Picture_1A_by_freespace.jpg", "lomiri:Wine_by_Jakkub_Mede.jpg", "lomiri:aitzgorri_by_Aitzol_Berasategi.jpg",
    "lomiri:free_by_Peter_Nerlich.jpg", "lomiri:friends_by_Aitzol_Berasategi.jpg",
    "lomiri:greentock_by_Peter_Nerlich.jpg", "lomiri:life_by_Aitzol_Berasategi.jpg",
    "lomiri:picosdeeuropa_by_Aitzol_Berasategi.jpg", "lomiri:seeding_by_Clements_Engelhardt.jpg",
    "lomiri:sunset_by_Aitzol_Berasategi.jpg", "lomiri:Kleiber_by_Lukas_Baubkus.jpg",
    # a jetty, a pier in fog, cups, a lake at dusk, rowing boats, a fallen leaf, a facade, a kite in the sky, a
    # field of moss, a forest path, a lake at night, waves on a beach
    "plasma:BytheWater/2560x1600.jpg", "plasma:ColdRipple/2560x1600.jpg", "plasma:ColorfulCups/2560x1600.jpg",
    "plasma:DarkestHour/2560x1600.jpg", "plasma:EveningGlow/2560x1600.jpg", "plasma:FallenLeaf/2560x1600.jpg",
    "plasma:Grey/2560x1600.jpg", "plasma:Kite/2560x1600.jpg", "plasma:OneStandsOut/2560x1600.jpg",
    "plasma:Path/2560x1600.jpg", "plasma:summer_1am/2560x1600.jpg", "plasma:Volna/5120x2880.jpg",
)
CROPS_PER_PHOTO = 64  # random crops of each training photo (docs/demo-model.md)
CAPTIONED_CROPS = 8  # random crops (30-100 % of the area: the subject stays in view) of each captioned photo
LFW_FACES = 100  # scikit-image's lfw_subset(): 100 faces (25 x 25, grey), then 100 patches without one
PROBLEM_SIZE = 10  # the headline metric: top-1 in problems of this many classes (docs/demo-model.md)


def load(name: str) -> Image.Image:
    """The RGB photo called ``name`` ("<source>:<name>", see :data:`HELDOUT`)."""
    source, _, item = name.partition(":")
    if source == "skimage":
        from skimage import data

        if item.startswith("lfw_subset/"):
            array = (_lfw_subset()[int(item.removeprefix("lfw_subset/"))] * 255).round().astype("uint8")
            return Image.fromarray(array).convert("RGB")
        array = getattr(data, item)()
        return Image.fromarray(array[..., :3] if array.ndim == 3 else array).convert("RGB")
    if source == "sklearn":
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(item)).convert("RGB")
    if source == "matplotlib":
        import matplotlib

        return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / item).convert("RGB")
    if source == "gcompris":
        from training.demo.gcompris import load as load_gcompris

        return load_gcompris(item)
    if source == "plasma":
        wallpaper, _, file = item.partition("/")
        item = f"{wallpaper}/contents/images/{file}"  # the Plasma package layout
    folder = {"mate": MATE_DIR, "tuxpaint": TEMPLATES_DIR, "lomiri": LOMIRI_DIR, "plasma": PLASMA_DIR,
              "opencv": OPENCV_DIR}.get(source)
    if folder is None:
        raise ValueError(f"unknown photo source in {name!r}: skimage, sklearn, matplotlib, mate, tuxpaint, lomiri, "
                         "plasma, opencv or gcompris")
    if not (folder / item).is_file():
        raise FileNotFoundError(f"{folder / item} is missing: apt-get install {' '.join(APT_PACKAGES)}")
    return Image.open(folder / item).convert("RGB")


@cache
def _lfw_subset():
    """scikit-image's LFW subset, read once (every face is a row of the same file)."""
    from skimage import data

    return data.lfw_subset()


def crops(image: Image.Image, count: int, seed: str, min_area: float = 0.1) -> list[Image.Image]:
    """``count`` random crops (area ``min_area``-1 of the photo, aspect 3/4-4/3, half of them mirrored), seeded by
    ``seed``: the same crops on every build."""
    rng = random.Random(int(hashlib.sha256(seed.encode()).hexdigest()[:16], 16))
    out = []
    for _ in range(count):
        area = image.width * image.height * rng.uniform(min_area, 1.0)
        aspect = rng.uniform(3 / 4, 4 / 3)
        width = min(image.width, round((area * aspect) ** 0.5))
        height = min(image.height, round((area / aspect) ** 0.5))
        left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
        crop = image.crop((left, top, left + width, top + height))
        out.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


def captioned() -> dict[str, str]:
    """Every captioned training photo -> its caption: GCompris's (training/demo/gcompris.py) and the LFW faces."""
    from training.demo.gcompris import captioned_photos

    return captioned_photos() | {f"skimage:lfw_subset/{i}": "a photo of a person." for i in range(LFW_FACES)}


def captioned_views(image: Image.Image, name: str, count: int = CAPTIONED_CROPS) -> list[Image.Image]:
    """A captioned photo whole, then ``count`` seeded crops of 30-100 % of its area."""
    return [image, *crops(image, count, name, min_area=0.3)]
