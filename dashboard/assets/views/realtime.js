// PLACEHOLDER: to be written (issue 17).
import { h, mount, header } from '../lib/dom.js';

export default {
  id: 'realtime',
  title: 'Realtime Inspector',
  group: 'Integrations',
  render(ctx, el) {
    mount(el, header('Realtime Inspector'), h('p', {}, 'Not built yet.'));
  },
};
