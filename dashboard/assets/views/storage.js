// PLACEHOLDER: to be written (issue 17).
import { h, mount, header } from '../lib/dom.js';

export default {
  id: 'storage',
  title: 'Storage',
  group: 'Storage',
  render(ctx, el) {
    mount(el, header('Storage'), h('p', {}, 'Not built yet.'));
  },
};
