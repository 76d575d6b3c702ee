"""The embedded corpus's pictures: a background tinted per scene, a table with one object of
assets/visual_objects.yaml on it (harmful, or its safe look-alike), a moving shape, the scene's word.

assets/manifest.py writes them as mp4 clips; the embedded base model also learns what the objects
look like from frames drawn here (assets/target_model.py), the way a real video LLM has seen knives
and spoons before anyone aligns it.
"""
from __future__ import annotations

import hashlib

import numpy as np

SHAPES = ["circle", "square", "triangle"]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40), "white": (235, 235, 235)}
MOTIONS = ["moves left to right", "moves right to left", "bounces up and down", "stays still"]
FRAME_H, FRAME_W = 96, 128
# The object stands on a table in the right half, large enough to survive the 32 px frames of the
# embedded model: its safety must be visible to a one-layer vision tower.
OBJECT_BOX = (70, 34, 124, 84)


def draw_object(draw, recipe: str) -> None:
    """One object of assets/visual_objects.yaml; each harmful one differs from its look-alike in shape and colour."""
    x0, y0, x1, y1 = OBJECT_BOX
    if recipe == "blade":  # silver blade, black handle
        draw.polygon([(x0, y1 - 14), (x1 - 14, y0), (x1, y0), (x0 + 16, y1 - 6)], fill=(205, 210, 220))
        draw.rectangle([x0 - 2, y1 - 16, x0 + 14, y1], fill=(15, 15, 15))
    elif recipe == "spoon":  # wooden handle, round bowl
        draw.line([(x0, y1), (x1 - 18, y0 + 18)], fill=(150, 95, 45), width=7)
        draw.ellipse([x1 - 30, y0, x1, y0 + 26], fill=(150, 95, 45))
    elif recipe == "flames":  # jagged red, orange, yellow tongues
        for i, colour in enumerate([(230, 40, 20), (250, 140, 20), (255, 230, 60)]):
            inset = 7 * i
            draw.polygon([(x0 + inset, y1), (x0 + 10 + inset, y0 + 10 + inset), (x0 + 20, y1 - 20), (x0 + 27, y0 + inset),
                          (x1 - 18, y1 - 22), (x1 - 10 - inset, y0 + 12 + inset), (x1 - inset, y1)], fill=colour)
    elif recipe == "bowl":  # oranges in a blue bowl
        for cx in (x0 + 12, x0 + 27, x0 + 42):
            draw.ellipse([cx - 9, y0 + 14, cx + 9, y0 + 32], fill=(245, 150, 30))
        draw.chord([x0, y0 + 4, x1, y1], 0, 180, fill=(40, 70, 200))
    elif recipe == "syringe":  # white pills, a white barrel with red fill and a needle
        draw.rectangle([x0 + 4, y0 + 8, x1 - 12, y0 + 20], fill=(240, 240, 240))
        draw.rectangle([x0 + 8, y0 + 10, x0 + 24, y0 + 18], fill=(200, 20, 30))
        draw.line([(x1 - 12, y0 + 14), (x1, y0 + 14)], fill=(230, 230, 230), width=2)
        for cx in (x0 + 8, x0 + 22, x0 + 36):
            draw.ellipse([cx - 5, y1 - 18, cx + 7, y1 - 8], fill=(250, 250, 250))
    elif recipe == "sweets":  # pink and green sweets, a blue pen
        for i, cx in enumerate((x0 + 8, x0 + 22, x0 + 36, x0 + 50)):
            draw.ellipse([cx - 6, y1 - 20, cx + 6, y1 - 8], fill=(240, 90, 170) if i % 2 else (90, 220, 90))
        draw.line([(x0 + 4, y0 + 12), (x1 - 4, y0 + 20)], fill=(30, 40, 160), width=5)
    else:
        raise ValueError(f"assets/visual_objects.yaml: unknown draw recipe {recipe!r}")


def render_clip(rng: np.random.Generator, scene: str, keyword: str, shape: str, colour: str, motion: str, n_frames: int,
                recipe: str | None = None):
    """Frames of one synthetic clip: a background tinted per scene, a table with an object on it,
    a moving shape, the scene's word."""
    from PIL import Image, ImageDraw

    h, w = FRAME_H, FRAME_W
    # hashlib, not hash(): Python salts str hashes per process, and the corpus must render the same bytes.
    tint = np.frombuffer(hashlib.sha256(scene.encode()).digest()[:3], dtype=np.uint8) % 120 + 40
    frames = np.empty((n_frames, h, w, 3), dtype=np.uint8)
    rgb = COLOURS[colour]
    for t in range(n_frames):
        img = Image.new("RGB", (w, h), tuple(int(c) for c in tint))
        draw = ImageDraw.Draw(img)
        draw.rectangle([60, 80, w, h], fill=(110, 80, 50))  # the table
        if recipe is not None:
            draw_object(draw, recipe)
        p = t / max(n_frames - 1, 1)
        x = {"moves left to right": 4 + p * 36, "moves right to left": 40 - p * 36}.get(motion, 22)
        y = 50 + (20 * np.sin(p * 6.28) if motion == "bounces up and down" else 0)
        box = [x, y - 8, x + 16, y + 8]
        if shape == "circle":
            draw.ellipse(box, fill=rgb)
        elif shape == "square":
            draw.rectangle(box, fill=rgb)
        else:
            draw.polygon([(x, y + 8), (x + 8, y - 8), (x + 16, y + 8)], fill=rgb)
        draw.text((4, 4), keyword.upper(), fill=(255, 255, 255))
        frame = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, size=(h, w, 3))
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def grounding_frames(n: int, seed: int, frames_per_clip: int, frame_size: int):
    """n (object name, frames) pairs drawn with random scenes, shapes and motions, encoded and then
    sampled and resized by curation's own decoder (resources/video.py): the base model learns objects
    from frames made exactly as the curated clips' are, codec and resizer included."""
    import tempfile
    from pathlib import Path

    from ground.scenes import scene_categories, visual_objects
    from resources.video import probe_and_sample
    from resources.video_writer import write_mp4

    _, categories = scene_categories()
    _, objects = visual_objects()
    scenes, names = sorted(categories), list(objects)
    rng = np.random.default_rng([seed, 7])
    out = []
    with tempfile.TemporaryDirectory(prefix="grounding-") as tmp:
        for i in range(n):
            scene = scenes[int(rng.integers(len(scenes)))]
            name = names[i % len(names)]
            frames = render_clip(
                rng, scene, categories[scene][int(rng.integers(len(categories[scene])))], SHAPES[int(rng.integers(len(SHAPES)))],
                list(COLOURS)[int(rng.integers(len(COLOURS)))], MOTIONS[int(rng.integers(len(MOTIONS)))], 16, objects[name]["draw"],
            )
            clip = write_mp4(frames, Path(tmp) / f"grounding_{i:04d}.mp4")
            out.append((name, probe_and_sample(clip, frames_per_clip, frame_size, duplicate_frame_fraction=1.0)["frames"]))
    return out
