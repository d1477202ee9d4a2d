"""Procedurally drawn, clearly labelled *synthetic* chest-radiograph-like films with paired reports.

Nothing here is a real patient. The films are grayscale PA-style projections drawn with numpy only
(PIL for the final image and the "SYNTHETIC" stamp): dark lung fields with faint vascular markings,
a bright mediastinum, heart and spine, posterior ribs, clavicles, diaphragm domes and sharp
costophrenic angles. Findings are drawn so that they are visible on the film:

- ``cardiomegaly``: the cardiac silhouette is widened (cardiothoracic ratio above ~0.55).
- ``pleural_effusion``: dense fluid fills the lung base with a meniscus and blunts the costophrenic angle.
- ``consolidation``: one or two irregular focal opacities inside a lung field.
- ``pneumothorax``: the lung edge retracts medially, a thin bright visceral pleural line appears and the
  space lateral to it is uniformly dark, with no lung markings.

Image left is the patient's right (PA convention); reports speak in patient terms.

Triage label (``URGENT_FINDINGS``): a case is ``urgent`` (1) when it has a pneumothorax, pleural effusion or
consolidation; normal films and cardiomegaly alone are ``non_urgent`` (0). ``sample_findings`` makes about
42% of cases urgent.

Anatomy is randomised per case (thorax size and position, rotation, heart size within the normal range,
rib spacing, exposure, contrast, noise), so an image-only model has to look at the findings.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..labels import policy

logger = logging.getLogger(__name__)

FINDINGS = ("cardiomegaly", "pleural_effusion", "consolidation", "pneumothorax")
# The synthetic findings that the label policy (qdistill_hf.labels.policy) calls urgent.
URGENT_FINDINGS = frozenset(f for f in FINDINGS if f in policy.URGENT_FINDINGS)
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


def is_urgent(findings: Sequence[str]) -> int:
    """Return 1 when any finding is in ``URGENT_FINDINGS`` else 0.

    Args:
        findings: finding names from ``FINDINGS``.
    """
    _check_findings(findings)
    return policy.is_urgent(findings)


def _check_findings(findings: Sequence[str]) -> None:
    unknown = [f for f in findings if f not in FINDINGS]
    if unknown:
        raise ValueError(f"unknown synthetic finding(s) {unknown}; known: {list(FINDINGS)}")


def sample_findings(rng: np.random.Generator) -> tuple[str, ...]:
    """Draw the findings of one case: 40% normal, 18% cardiomegaly alone, 42% urgent.

    An urgent case has one urgent finding, and with probability 0.3 one more finding
    (cardiomegaly or another urgent finding).

    Args:
        rng: the random generator to draw from.
    """
    r = rng.random()
    if r < 0.40:
        return ()
    if r < 0.58:
        return ("cardiomegaly",)
    urgent = ("pleural_effusion", "consolidation", "pneumothorax")
    first = urgent[int(rng.integers(3))]
    found = {first}
    if rng.random() < 0.3:
        found.add(FINDINGS[int(rng.integers(len(FINDINGS)))])
    return tuple(f for f in FINDINGS if f in found)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(img, dtype=np.float32), -1.5, 1.5)


def _smoothstep(edge: float, x: np.ndarray) -> np.ndarray:
    """Soft step from 0 (x << 0) to 1 (x >> 0) over a width ``edge``."""
    return 1.0 / (1.0 + np.exp(-np.clip(x / edge, -30, 30)))


def _draw_details(rng: np.random.Generator, findings: Sequence[str]) -> dict:
    """Random sidedness/extent of each finding, used by both the drawing and the report."""
    details: dict = {}
    for f in findings:
        side = "right" if rng.random() < 0.5 else "left"
        if f == "cardiomegaly":
            details[f] = {"scale": float(rng.uniform(1.32, 1.55))}
        elif f == "pleural_effusion":
            details[f] = {"side": side, "level": float(rng.uniform(0.30, 0.62))}
        elif f == "consolidation":
            zone = ("upper", "middle", "lower")[int(rng.integers(3))]
            details[f] = {"side": side, "zone": zone, "count": 1 + int(rng.random() < 0.3)}
        elif f == "pneumothorax":
            details[f] = {"side": side, "depth": float(rng.uniform(0.30, 0.55))}
    # One pleural space holds either air or fluid in this generator: put them on opposite sides.
    if "pleural_effusion" in details and "pneumothorax" in details:
        other = "left" if details["pleural_effusion"]["side"] == "right" else "right"
        details["pneumothorax"]["side"] = other
    return details


def _render_array(rng: np.random.Generator, details: dict, size: int) -> np.ndarray:
    """Draw one film as float32 in [0, 1] (bright = dense)."""
    # Randomised pose: rotation, shift and scale of the whole thorax.
    angle = math.radians(rng.uniform(-5.0, 5.0))
    shift_x, shift_y = rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)
    scale = rng.uniform(0.90, 1.05)
    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    gy, gx = np.meshgrid(lin, lin, indexing="ij")
    ca, sa = math.cos(angle), math.sin(angle)
    x = ((gx - shift_x) * ca + (gy - shift_y) * sa) / scale
    y = (-(gx - shift_x) * sa + (gy - shift_y) * ca) / scale
    px = 2.0 / size / scale  # one pixel in thorax units, for edge widths

    edge = max(px, 0.012)
    # Soft tissue of the trunk (shoulders narrow towards the neck).
    half_width = 0.93 - 0.25 * np.clip(-(y + 0.55) / 0.45, 0, 1) ** 2
    body = _smoothstep(edge * 2, half_width - np.abs(x)) * _smoothstep(edge * 2, y + 0.98)
    img = 0.06 + 0.40 * body

    # Lung fields: two tall ellipses, cut below by the diaphragm domes.
    lung_cx, lung_cy = rng.uniform(0.36, 0.42), rng.uniform(-0.08, 0.0)
    lung_rx, lung_ry = rng.uniform(0.27, 0.31), rng.uniform(0.56, 0.64)
    dome_right = lung_cy + lung_ry * rng.uniform(0.55, 0.70)  # patient right (image left) sits higher
    dome_left = dome_right + rng.uniform(0.02, 0.07)
    dome_h = rng.uniform(0.16, 0.24)

    ptx = details.get("pneumothorax")
    effusion = details.get("pleural_effusion")
    lungs = np.zeros_like(img)
    air = np.zeros_like(img)
    markings_mask = np.zeros_like(img)
    for sgn, side, dome_y in ((-1.0, "right", dome_right), (1.0, "left", dome_left)):
        cx = sgn * lung_cx
        # Lateral lung wall is rounder than the mediastinal border.
        d = ((x - cx) / lung_rx) ** 2 + ((y - lung_cy) / lung_ry) ** 2
        inside = _smoothstep(edge / lung_rx, 1.0 - d)
        dome = dome_y - dome_h * np.clip(1.0 - ((x - cx) / (lung_rx * 1.15)) ** 2, 0, 1)
        inside *= _smoothstep(edge, dome - y)
        lung_side = inside
        if ptx is not None and ptx["side"] == side:
            # Collapsed lung: a smaller ellipse hugging the hilum; lateral to it only pleural air.
            depth = ptx["depth"]
            ccx = cx - sgn * lung_rx * depth * 0.55
            crx, cry = lung_rx * (1.0 - depth * 0.6), lung_ry * (1.0 - depth * 0.35)
            dc = ((x - ccx) / crx) ** 2 + ((y - lung_cy - lung_ry * depth * 0.25) / cry) ** 2
            collapsed = _smoothstep(edge / crx, 1.0 - dc) * inside
            air += inside * (1.0 - collapsed)
            # Thin visceral pleural line along the collapsed edge.
            line_w = max(px * 1.2, 0.006)
            ring = np.exp(-(((np.sqrt(dc) - 1.0) * min(crx, cry)) / line_w) ** 2) * inside
            air_ring = ring * (np.abs(x - ccx) > 0.25 * crx)  # medial part merges with the hilum
            img += 0.16 * air_ring
            markings_mask += collapsed
        else:
            markings_mask += inside
        lungs += lung_side
    lungs = np.clip(lungs, 0, 1)
    img -= 0.30 * lungs
    img -= 0.08 * np.clip(air, 0, 1)  # pleural air is darker than aerated lung

    # Vascular markings: branching-looking smooth noise, denser towards the hila.
    hilum = np.exp(-((np.abs(x) - 0.18) ** 2 / 0.08 + (y + 0.05) ** 2 / 0.12))
    vessels = np.abs(_smooth_noise(rng, size, 18)) < 0.12
    texture = 0.05 * vessels.astype(np.float32) + 0.03 * _smooth_noise(rng, size, 9)
    img += np.clip(markings_mask, 0, 1) * (texture * (0.5 + hilum) + 0.10 * hilum)

    # Posterior ribs: arcs across each hemithorax, bright thin bands.
    rib_gap = rng.uniform(0.105, 0.125)
    rib_top = lung_cy - lung_ry * 0.95
    rib_w = max(rib_gap * 0.22, px * 1.5)
    for sgn in (-1.0, 1.0):
        cx = sgn * lung_cx
        u = (x - cx * 0.2) * sgn  # 0 at the spine, positive laterally
        arc = 0.9 * np.clip(u - 0.1, 0, None) ** 2 - 0.25 * np.clip(u, 0, 0.3)
        for k in range(10):
            y0 = rib_top + k * rib_gap
            band = np.exp(-(((y - y0 - arc) / rib_w) ** 2))
            band *= (u > 0.04) * _smoothstep(edge, 0.90 - np.abs(x)) * _smoothstep(0.04, dome_right - 0.05 - y)
            # Ribs show mostly against the dark lung, faintly over soft tissue.
            img += band * (0.035 + 0.06 * lungs)
    # Clavicles.
    for sgn in (-1.0, 1.0):
        u = x * sgn
        cy = lung_cy - lung_ry * 0.92 - 0.22 * (u - 0.10)
        clav = np.exp(-(((y - cy) / 0.025) ** 2)) * (u > 0.08) * (u < 0.70)
        img += 0.14 * clav

    # Spine and mediastinum.
    spine_w = rng.uniform(0.055, 0.07)
    spine = _smoothstep(edge, spine_w - np.abs(x)) * _smoothstep(edge, y + 0.98)
    vertebrae = 0.5 + 0.5 * np.cos((y - rng.uniform(0, 1)) * 2 * math.pi / rng.uniform(0.09, 0.11))
    img += spine * (0.10 + 0.04 * vertebrae)
    med_w = 0.09 + 0.05 * np.clip((y + 0.3) / 0.4, 0, 1)
    mediastinum = _smoothstep(edge, med_w - np.abs(x + 0.01)) * _smoothstep(edge, lung_cy + lung_ry - y)
    img += 0.20 * mediastinum * (1.0 - spine)

    # Heart: an ellipse bulging to the patient's left (image right), resting on the left dome.
    heart_scale = details.get("cardiomegaly", {}).get("scale", rng.uniform(0.92, 1.05))
    heart_rx = 0.31 * heart_scale
    heart_ry = 0.22 * (1.0 + 0.3 * (heart_scale - 1.0))
    heart_cx = 0.07 + 0.45 * (heart_rx - 0.31)
    heart_cy = dome_left - dome_h * 0.5 - heart_ry * 0.85
    dh = ((x - heart_cx) / heart_rx) ** 2 + ((y - heart_cy) / heart_ry) ** 2
    heart = _smoothstep(edge / heart_rx, 1.0 - dh)
    img = img * (1.0 - heart) + heart * np.maximum(img, 0.60 + 0.04 * spine)

    # Abdomen under the domes is soft-tissue dense.
    for sgn, dome_y in ((-1.0, dome_right), (1.0, dome_left)):
        half = (x * sgn > 0) * body
        dome = dome_y - dome_h * np.clip(1.0 - ((x - sgn * lung_cx) / (lung_rx * 1.15)) ** 2, 0, 1)
        img += 0.06 * half * _smoothstep(edge, y - dome)

    if effusion is not None:
        sgn = -1.0 if effusion["side"] == "right" else 1.0
        cx = sgn * lung_cx
        dome_y = dome_right if sgn < 0 else dome_left
        level = dome_y - effusion["level"] * lung_ry * 1.2
        # Meniscus: the fluid climbs laterally along the chest wall.
        meniscus = level - 0.22 * np.clip((x - cx) * sgn / lung_rx + 0.4, 0, None) ** 2
        fluid = _smoothstep(edge * 2.5, y - meniscus) * lungs * (x * sgn > 0) * (1.0 - heart)
        img += fluid * (0.26 + 0.25 * np.clip(y - meniscus, 0, 0.3))

    cons = details.get("consolidation")
    if cons is not None:
        sgn = -1.0 if cons["side"] == "right" else 1.0
        zone_y = {"upper": -0.45, "middle": -0.08, "lower": 0.22}[cons["zone"]]
        blobs = np.zeros_like(img)
        for _ in range(cons["count"]):
            bx = sgn * (lung_cx + rng.uniform(-0.10, 0.10))
            by = lung_cy + zone_y * lung_ry / 0.6 + rng.uniform(-0.08, 0.08)
            r = rng.uniform(0.08, 0.15)
            rough = 1.0 + 0.35 * _smooth_noise(rng, size, 7)
            db = np.sqrt((x - bx) ** 2 + (y - by) ** 2) / (r * rough)
            blobs = np.maximum(blobs, _smoothstep(0.12, 1.0 - db))
        img += 0.28 * blobs * np.clip(lungs - air, 0, 1)

    # Exposure, contrast, noise: random per film and unrelated to the findings.
    img = (img - 0.25) * rng.uniform(0.85, 1.2) + 0.25 + rng.uniform(-0.06, 0.06)
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.03), size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _stamp(image: Image.Image) -> Image.Image:
    """Write "SYNTHETIC" small in the top-left corner."""
    draw = ImageDraw.Draw(image)
    draw.text((2, 1), "SYNTHETIC", fill=235)
    return image


def build_report(findings: Sequence[str], details: dict | None = None, rng: np.random.Generator | None = None) -> str:
    """Build a "FINDINGS: … IMPRESSION: …" report for the given findings, with negated normal statements.

    Args:
        findings: finding names from ``FINDINGS``.
        details: per-finding side/extent as drawn (see ``render_case``); generic wording when None.
        rng: generator for the wording variants; the first variant is used when None.
    """
    _check_findings(findings)
    details = details or {}

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))] if rng is not None else options[0]

    sentences: list[str] = []
    impression: list[str] = []
    if "cardiomegaly" in findings:
        sentences.append(pick(("The cardiac silhouette is enlarged.", "Moderate cardiomegaly.")))
        impression.append("Cardiomegaly.")
    else:
        sentences.append(pick(("Heart size is normal.", "The cardiomediastinal silhouette is within normal limits.")))
    if "consolidation" in findings:
        d = details.get("consolidation", {})
        where = f" in the {d['side']} {d['zone']} zone" if d else ""
        sentences.append(f"Focal airspace opacity{where}, consistent with consolidation.")
        impression.append(f"{d.get('side', '').capitalize() + ' ' if d else ''}consolidation.".capitalize())
    else:
        sentences.append(pick(("No focal consolidation.", "The lungs are clear without focal airspace opacity.")))
    if "pleural_effusion" in findings:
        d = details.get("pleural_effusion", {})
        size = ("small" if d.get("level", 0.3) < 0.42 else "moderate") if d else "small"
        side = f"{d['side']} " if d else ""
        sentences.append(f"There is a {size} {side}pleural effusion with blunting of the costophrenic angle.")
        impression.append(f"{size.capitalize()} {side}pleural effusion.")
    else:
        sentences.append("No pleural effusion.")
    if "pneumothorax" in findings:
        d = details.get("pneumothorax", {})
        size = ("small" if d.get("depth", 0.3) < 0.42 else "moderate") if d else "small"
        side = f"{d['side']} " if d else ""
        sentences.append(f"{size.capitalize()} {side}pneumothorax with a visible visceral pleural line.")
        impression.append(f"{size.capitalize()} {side}pneumothorax.")
    else:
        sentences.append("No pneumothorax.")
    sentences.append(pick(("The osseous structures are intact.", "No acute osseous abnormality.")))
    if not impression:
        impr = "No acute cardiopulmonary process."
    else:
        impr = " ".join(f"{i}. {text}" for i, text in enumerate(impression, start=1))
    return "FINDINGS: " + " ".join(sentences) + "\nIMPRESSION: " + impr


def render_case(seed: int, findings: Sequence[str] = (), image_size: int = 224) -> tuple[Image.Image, str]:
    """Draw one synthetic film and its report.

    Args:
        seed: integer seed; the same (seed, findings, image_size) gives identical pixels and text.
        findings: finding names from ``FINDINGS`` (empty for a normal film).
        image_size: side of the square grayscale image in pixels (>= 32).

    Returns:
        ``(image, report)``: a mode "L" PIL image stamped "SYNTHETIC" and the report text.
    """
    image, report, _ = _render(np.random.default_rng(seed), tuple(findings), image_size)
    return image, report


def _render(rng: np.random.Generator, findings: tuple[str, ...], image_size: int) -> tuple[Image.Image, str, dict]:
    _check_findings(findings)
    if int(image_size) < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    details = _draw_details(rng, findings)
    arr = _render_array(rng, details, int(image_size))
    image = _stamp(Image.fromarray(np.round(arr * 255.0).astype(np.uint8), mode="L"))
    report = build_report(findings, details, rng)
    return image, report, details


def generate_case(seed: int, split: str, index: int, image_size: int = 224) -> dict:
    """Draw case ``index`` of ``split`` for a dataset seed: findings are sampled, then rendered.

    Args:
        seed: dataset seed.
        split: "train", "validation" or "test" (each split is an independent stream).
        index: 0-based case index within the split.
        image_size: image side in pixels.

    Returns:
        A dict with ``study_id``, ``image`` (PIL), ``report``, ``findings`` (tuple), ``label`` (0/1) and ``details``.
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {list(SPLIT_CODES)}, got {split!r}")
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])
    findings = sample_findings(rng)
    image, report, details = _render(rng, findings, image_size)
    return {
        "study_id": f"synthetic-{split}-{seed}-{index:06d}",
        "image": image,
        "report": report,
        "findings": findings,
        "label": is_urgent(findings),
        "details": details,
    }


def png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG bytes (deterministic for identical pixels).

    Args:
        image: the image to encode.
    """
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_contact_sheet(path: str, num_cases: int = 12, image_size: int = 224, seed: int = 0, columns: int = 4) -> str:
    """Render ``num_cases`` training cases into one captioned PNG grid for eyeballing.

    Args:
        path: output PNG path.
        num_cases: number of films.
        image_size: side of each film in pixels.
        seed: dataset seed (cases are ``generate_case(seed, "train", i)``).
        columns: films per row.

    Returns:
        The path written.
    """
    rows = math.ceil(num_cases / columns)
    caption_h = 14
    sheet = Image.new("L", (columns * image_size, rows * (image_size + caption_h)), color=0)
    draw = ImageDraw.Draw(sheet)
    for i in range(num_cases):
        case = generate_case(seed, "train", i, image_size)
        col, row = i % columns, i // columns
        x0, y0 = col * image_size, row * (image_size + caption_h)
        sheet.paste(case["image"], (x0, y0))
        caption = ",".join(f[:6] for f in case["findings"]) or "normal"
        draw.text((x0 + 2, y0 + image_size + 1), f"{i}: {caption} ({'U' if case['label'] else 'N'})", fill=255)
    sheet.save(path)
    logger.info("wrote synthetic contact sheet with %d films to %s", num_cases, path)
    return path


__all__ = [
    "FINDINGS",
    "URGENT_FINDINGS",
    "build_report",
    "generate_case",
    "is_urgent",
    "png_bytes",
    "render_case",
    "sample_findings",
    "save_contact_sheet",
]
