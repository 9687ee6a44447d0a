{
  "targets": [
    {
      "target_name": "vmferry_native",
      "sources": ["vmferry_native.c"],
      "cflags": ["-O2", "-Wall"],
      "libraries": ["-lm"]
    }
  ]
}
