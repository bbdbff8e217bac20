"""Teachers and the soft targets they give: loading a local teacher safely, its forward on every batch,
its outputs cached on disk, or a teacher behind a server (remote/). One interface (source.py) for all."""
