"""The `roomsecrets` command: `serve`, `token` and `rewrap` for operators (operator.py), and the
room Secrets API through the Python client (room.py). Entry point: main.py."""
