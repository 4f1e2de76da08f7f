"""`sparsevlm visualize`: a PNG of the patches kept at each pruning layer for one question.

On LLaVA-NeXT the picture is drawn on the original image (base-tile cells above, grid cells
below, `sparsevlm_jax.visualize.render_anyres`) and the output says the image's visual count.
"""

from __future__ import annotations

import argparse

from sparsevlm_jax.cli.errors import EXIT_OK
from sparsevlm_jax.cli.generate import run_one
from sparsevlm_jax.video import Video


def cmd_visualize(args: argparse.Namespace) -> int:
    """Answers the prompt, then writes the kept-patch picture (atomically) and says so."""
    from sparsevlm_jax.visualize import kept_picture, save_atomic

    pipe, image, result, _, stats = run_one(args, picture=args.out)
    if isinstance(image, Video):
        if pipe.cfg.qwen:  # a token per 28x28 cell per frame pair
            from sparsevlm_jax.visualize_qwen import render_qwen_video

            picture = render_qwen_video(image, pipe.processor, stats["layers"])
        else:
            from sparsevlm_jax.visualize_video import video_picture

            picture = video_picture(image, pipe.processor, pipe.cfg, stats["layers"])
    elif pipe.cfg.qwen:  # its 28x28 cells on the original image
        from sparsevlm_jax.visualize_qwen import render_qwen

        picture = render_qwen(image, pipe.processor, stats["layers"])
    else:
        picture = kept_picture(image, pipe.processor, pipe.cfg, stats["layers"])
    from sparsevlm_jax.eval import environment_errors

    with environment_errors(args.out):  # a full disk: one line, nothing written
        save_atomic(picture, args.out)
    print(result.text)
    if isinstance(image, Video):
        print(f"video {image.source}: frames {list(image.indices)} of {image.total_frames}, "
              f"{stats['visual_tokens']} visual tokens")  # fmt: skip
    elif pipe.cfg.anyres or pipe.cfg.qwen:
        print(f"image {image.height}x{image.width} (h x w): {stats['visual_tokens']} visual tokens")
    for x in stats["layers"]:
        print(f"layer {x['layer']}: {len(x['kept'])} kept + {x['recycled']} recycled")
    print(f"wrote {args.out} ({picture.width}x{picture.height}, {len(stats['layers']) + 1} panels)")
    return EXIT_OK
