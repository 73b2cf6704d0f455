"""The HTTP edge: routes parse typed requests, call one service method, and return typed responses."""
