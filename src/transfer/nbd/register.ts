/**
 * Registers the nbd://, nbd+unix://, nbd+tcp://, nbds:// and nbds+unix:// names with the disk
 * plane's openImage. The client loads only when such a name is opened, so commands that never
 * meet one do not pay for it at start-up.
 */
import { UsageError } from '../../disk/errors.js';
import { registerUriOpener } from '../../disk/registry.js';

for (const scheme of ['nbd', 'nbd+unix', 'nbd+tcp', 'nbds', 'nbds+unix', 'nbds+tcp']) {
  registerUriOpener(scheme, async (uri, options) => {
    if (options.format && options.format !== 'raw') {
      throw new UsageError(
        `an NBD export is read as raw guest bytes (the server decodes the image); -f ${options.format} does not apply`,
        uri,
      );
    }
    return (await import('./reader.js')).NbdDiskReader.open(uri);
  });
}
