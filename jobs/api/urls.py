from django.urls import path, re_path

from jobs.api import auth, batches, files

urlpatterns = [
    path("files", files.collection, name="api_files"),
    path("files/<str:file_id>", files.detail, name="api_file"),
    path("files/<str:file_id>/content", files.content, name="api_file_content"),
    path("batches", batches.collection, name="api_batches"),
    path("batches/<str:batch_id>", batches.detail, name="api_batch"),
    path("batches/<str:batch_id>/cancel", batches.cancel, name="api_batch_cancel"),
    re_path(r"^(?P<rest>.*)$", auth.not_found),
]
