from django.urls import path

from . import views

urlpatterns = [
    path("health", views.health),
    path("api/items", views.items),
    path("api/items/<int:item_id>", views.item),
    path("api/search", views.search),
    path("api/upload", views.upload),
    path("api/boom", views.boom),
    path("api/stream", views.stream),
    path("api/events", views.events),
]

handler404 = "mysite.views.not_found"
handler500 = "mysite.views.server_error"
