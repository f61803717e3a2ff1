"""Training pieces shared by the scripts, the CLI and the studio: data, noise and loss, class images, checkpoints,
and the DreamBooth loop itself."""
