{
  "targets": [
    {
      "target_name": "vmferry_native",
      "sources": ["vmferry_native.c", "v8_flags.cc"],
      "cflags": ["-O2", "-Wall"],
      "cflags_cc": ["-O2", "-Wall", "-std=c++17"],
      "libraries": ["-lm"]
    }
  ]
}
