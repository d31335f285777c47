#!/usr/bin/env bash
# supervisord's supercronic program: runs the crontab at $CRONTAB_PATH (tests hand their own),
# else the image's $APP_DIR/crontab. supervisord's %(ENV_X)s has no default, hence this wrapper.
set -euo pipefail
exec supercronic -passthrough-logs "${CRONTAB_PATH:-$APP_DIR/crontab}"
