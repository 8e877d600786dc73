from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("sync", views.sync_view),
    path("stream-consumer", views.stream_consumer_view),
    path("async", views.async_view),
    path("body", views.body_view),
    path("post", views.post_view),
    path("upload", views.upload_view),
    path("read", views.read_view),
    path("stream", views.stream_sync_view),
    path("astream", views.stream_async_view),
    path("endless", views.endless_view),
    path("file", views.file_view),
    path("stream-boom", views.stream_boom_view),
    path("stream-mixed", views.stream_mixed_view),
    path("raise", views.raising_view),
    path("cookies", views.cookie_view),
    path("echo", views.echo_view),
]
