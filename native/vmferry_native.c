// Small helpers Node's fs lacks: SEEK_DATA/SEEK_HOLE so raw files map their holes
// without reading them, hole punching for sparse raw output, and read windows that map a file's
// pages instead of copying them (a plain copy then moves each byte once, not twice).
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <fcntl.h>
#include <node_api.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static napi_value throw_errno(napi_env env, const char *what) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(errno));
  napi_throw_error(env, NULL, msg);
  return NULL;
}

// seek(fd, offset, whence: 0 = data, 1 = hole) -> next offset, or -1 when there is none (ENXIO)
static napi_value seek_data_hole(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd, which;
  int64_t offset;
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int32(env, argv[2], &which) != napi_ok) {
    napi_throw_type_error(env, NULL, "seek(fd, offset, which)");
    return NULL;
  }
  off_t r = lseek(fd, (off_t)offset, which == 0 ? SEEK_DATA : SEEK_HOLE);
  napi_value out;
  if (r < 0) {
    if (errno == ENXIO) {
      napi_create_int64(env, -1, &out);
      return out;
    }
    return throw_errno(env, "lseek");
  }
  napi_create_int64(env, (int64_t)r, &out);
  return out;
}

// punchHole(fd, offset, length): deallocate a range, keeping the file size
static napi_value punch_hole(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd;
  int64_t offset, length;
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[2], &length) != napi_ok) {
    napi_throw_type_error(env, NULL, "punchHole(fd, offset, length)");
    return NULL;
  }
  napi_value out;
  int ok = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) == 0;
  napi_get_boolean(env, ok, &out);
  return out;
}

static void unmap_window(napi_env env, void *data, void *hint) {
  (void)env;
  munmap(data, (size_t)(uintptr_t)hint);
}

// mapWindow(length) -> Buffer: private anonymous memory, page aligned, that mapFile can later point
// at a file's pages. Freed (unmapped) by the garbage collector.
static napi_value map_window(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t length;
  if (argc < 1 || napi_get_value_int64(env, argv[0], &length) != napi_ok || length <= 0) {
    napi_throw_type_error(env, NULL, "mapWindow(length)");
    return NULL;
  }
  void *p = mmap(NULL, (size_t)length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return throw_errno(env, "mmap");
  napi_value out;
  if (napi_create_external_buffer(env, (size_t)length, p, unmap_window, (void *)(uintptr_t)length, &out) != napi_ok) {
    munmap(p, (size_t)length);
    napi_throw_error(env, NULL, "external buffers are not allowed here");
    return NULL;
  }
  return out;
}

// mapFile(buffer, fd, offset, length) -> bool: replaces the pages under buffer[0, length) with a
// private (copy-on-write) mapping of the file at offset. The buffer and the offset must be page
// aligned and the range inside the file (pages past the end would fault). False when it cannot be
// done: the caller then reads the ordinary way.
static napi_value map_file(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  void *data;
  size_t size;
  int32_t fd;
  int64_t offset, length;
  napi_value out;
  if (argc < 4 || napi_get_buffer_info(env, argv[0], &data, &size) != napi_ok ||
      napi_get_value_int32(env, argv[1], &fd) != napi_ok || napi_get_value_int64(env, argv[2], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[3], &length) != napi_ok) {
    napi_throw_type_error(env, NULL, "mapFile(buffer, fd, offset, length)");
    return NULL;
  }
  long page = sysconf(_SC_PAGESIZE);
  int ok = length > 0 && (size_t)length <= size && ((uintptr_t)data % (uintptr_t)page) == 0 && offset >= 0 &&
           offset % page == 0;
  if (ok) {
    size_t span = ((size_t)length + (size_t)page - 1) / (size_t)page * (size_t)page;
    // The window must cover whole pages of its own, or the mapping would spill past the buffer.
    ok = span <= size && mmap(data, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, (off_t)offset) != MAP_FAILED;
    // Pages not in the cache are read ahead now, in large requests, instead of a fault at a time.
    if (ok) madvise(data, span, MADV_WILLNEED);
  }
  napi_get_boolean(env, ok, &out);
  return out;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"seek", NULL, seek_data_hole, NULL, NULL, NULL, napi_default, NULL},
      {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_default, NULL},
      {"mapWindow", NULL, map_window, NULL, NULL, NULL, napi_default, NULL},
      {"mapFile", NULL, map_file, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
