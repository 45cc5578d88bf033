# LIVE ONLY (removed by the installer): start the installer dialog on an interactive login.
if [ -d /run/live/medium ] && [ -z "${KEEL_NO_DIALOG:-}" ] && [ -t 0 ] \
   && ! grep -qw 'keel.installer=off' /proc/cmdline; then
  export KEEL_NO_DIALOG=1
  /usr/bin/keel-installer tui || echo "keel-installer: dialog ended; type 'keel-installer tui' to start it again."
fi
