#!/bin/sh
# `unmask serve --host 0.0.0.0 --port 8000` on the image's device (cuda or cpu, from the build's DEVICE).
# Arguments given to `docker run IMAGE ...` are appended, so they override these (--device cpu, --port ...).
exec unmask serve --host 0.0.0.0 --port 8000 --device "${UNMASK_DEVICE:-cpu}" "$@"
