# Shared by the launch scripts (sourced, not run): how commands are printed.

# One argument as the shell would need it: bare if safe, else single-quoted.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A command as it would be typed, like `set -x` prints it: "+ cmd arg ...".
command_line() {
  local line="+" arg
  for arg in "$@"; do line+=" $(quote "$arg")"; done
  printf '%s\n' "$line"
}
