// setV8Flags(flags): V8's flags for this process, as `node --flag` would set them. N-API does not
// reach V8's flags, so this one function uses Node's own V8 headers; node:v8's setFlagsFromString
// would load Node's 16 stream modules (3 ms) for the same call.
#include <node_api.h>
#include <v8.h>

#include <string>

extern "C" napi_value vmferry_set_v8_flags(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  size_t length = 0;
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  if (argc < 1 || napi_get_value_string_utf8(env, argv[0], nullptr, 0, &length) != napi_ok) {
    napi_throw_type_error(env, nullptr, "setV8Flags(string)");
    return nullptr;
  }
  std::string flags(length + 1, '\0');
  napi_get_value_string_utf8(env, argv[0], &flags[0], flags.size(), &length);
  flags.resize(length);
  v8::V8::SetFlagsFromString(flags.c_str(), flags.size());
  return nullptr;
}
