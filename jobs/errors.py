"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`: the /v1 API answers every
error with it, and so does the request-limit middleware for /v1 paths, so SDK clients can read it."""

from django.http import JsonResponse


class ApiError(Exception):
    """An error that becomes OpenAI's `{"error": {...}}` body with `status`."""

    def __init__(self, status: int, message: str, type="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JsonResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JsonResponse({"error": error}, status=self.status, headers=self.headers)
