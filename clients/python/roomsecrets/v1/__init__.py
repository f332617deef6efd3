"""Generated from proto/roomsecrets/v1 by tools/gen.sh; do not edit."""
